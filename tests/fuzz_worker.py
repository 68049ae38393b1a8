"""The worker process of tests/test_fuzz_checkpoints.py: it loads the checkpoints it is sent, one at a time, and
reports how each went, so that a crash or a hang takes down this process only (the test restarts it).

    python fuzz_worker.py WARMUP_PATH...

It first loads and runs each WARMUP_PATH (valid checkpoints), so that the thread pools and kernel layouts exist,
then caps its address space a fixed amount above what that took: a corrupt size field that makes the engine
allocate more than a tiny checkpoint could need fails there with MemoryError, reported as an untyped error,
instead of swapping the machine. Then it answers one JSON line on stdout for each JSON line on stdin:

    {"id": 3, "kind": "load" | "tokenizer", "path": ...}
 -> {"id": 3, "outcome": "ok" | "error", "type": ..., "typed": bool, "message": ..., "trace": ...}

"load" runs LLM(path), generates two greedy tokens from a raw prompt and, when the tokenizer has a chat
template, two more from a rendered chat. "tokenizer" builds only the tokenizer (a tokenizer.json folder or a
GGUF file's metadata) and runs it: encode, decode, chat template.
"""
import json
import logging
import os
import resource
import sys
import traceback

import torch

from flashgen.engine.gguf import CheckpointError, GGUFFile
from flashgen.engine.llm import LLM
from flashgen.engine.tokenizer import gguf_tokenizer, load_hf_tokenizer

log = logging.getLogger("flashgen.fuzz")
TYPED_ERRORS = (CheckpointError, ValueError, FileNotFoundError)
ADDRESS_SPACE_HEADROOM = 256 << 20  # the tiny checkpoints need a few MiB each
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 😀"}]
TEXTS = ["Hello world!", "  two  spaces\tand\nnewlines", "café 東京 😀"]


def load_and_generate(path):
    llm = LLM(path, device="cpu", max_seq_len=64)
    llm.generate("Hello world", max_new_tokens=2, temperature=0)
    if llm.tokenizer.chat_template:
        ids = llm.chat_prompt_ids(MESSAGES)
        # The template is under test, not the context length: a long rendering is cut to what fits.
        for _ in llm.stream(None, prompt_token_ids=ids[-16:], max_new_tokens=2, temperature=0):
            pass


def build_tokenizer(path):
    tok = load_hf_tokenizer(path) if os.path.isdir(path) else gguf_tokenizer(GGUFFile(path).meta, source=path)
    for text in TEXTS:
        tok.decode(tok.encode(text))
    if tok.chat_template:
        tok.apply_chat_template(MESSAGES)


KINDS = {"load": load_and_generate, "tokenizer": build_tokenizer}


def run_case(case):
    try:
        KINDS[case["kind"]](case["path"])
    except BaseException as e:  # noqa: B036 (a Rust panic arrives as a BaseException: it is reported, as untyped)
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        return {"id": case["id"], "outcome": "error", "type": type(e).__name__, "typed": isinstance(e, TYPED_ERRORS),
                "message": str(e), "trace": traceback.format_exc(limit=-6)}
    return {"id": case["id"], "outcome": "ok"}


def cap_address_space(headroom):
    with open("/proc/self/statm") as f:
        size = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    resource.setrlimit(resource.RLIMIT_AS, (size + headroom, size + headroom))


def main(warmup_paths):
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="fuzz worker: %(message)s")
    torch.set_num_threads(1)  # one worker per core
    for path in warmup_paths:
        KINDS["load"](path)
    cap_address_space(ADDRESS_SPACE_HEADROOM)
    # Replies go to the original stdout; anything a library prints (Python or C) goes to stderr instead.
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    replies.write(json.dumps({"ready": True}) + "\n")
    replies.flush()
    for line in sys.stdin:
        replies.write(json.dumps(run_case(json.loads(line))) + "\n")
        replies.flush()


if __name__ == "__main__":
    main(sys.argv[1:])
