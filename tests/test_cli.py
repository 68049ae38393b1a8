"""The `flashgen` CLI end to end on a tiny saved model: generate, chat, bench and the error cases."""
import json
import re
import subprocess
import sys

import pytest
from tiny_models import tiny_models  # noqa: F401  (pytest fixture)

from flashgen.engine.cli import main
from flashgen.engine.llm import LLM

STATS = re.compile(r"^\[prompt \d+ tokens, \d+ new tokens; prefill [\d.]+ tok/s, decode [\d.]+ tok/s\]$")


@pytest.fixture(scope="module")
def model(tiny_models):  # noqa: F811
    return tiny_models["llama"]


def run(capsys, argv):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err):
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "error" in lines[0], err
    assert "Traceback" not in err


@pytest.mark.parametrize("extra", [[], ["--no-stream"], ["--raw"]])
def test_generate_prints_the_greedy_text_and_stats(capsys, model, extra):
    argv = ["generate", "--model", model, "--prompt", "Hello world", "--temperature", "0", "-n", "12", *extra]
    code, out, err = run(capsys, argv)
    assert code == 0
    llm = LLM(model)
    ids = (llm.tokenizer.encode("Hello world") if "--raw" in extra
           else llm.chat_prompt_ids([{"role": "user", "content": "Hello world"}]))
    want = "".join(llm.stream(None, prompt_token_ids=ids, max_new_tokens=12, temperature=0))
    assert out == want + "\n"
    assert STATS.match(err.strip().splitlines()[-1]), err


def test_generate_with_sampling_options_is_reproducible(capsys, model):
    argv = ["generate", "--model", model, "--prompt", "The quick", "-n", "10", "--seed", "7", "--temperature", "1.1",
            "--top-k", "0", "--top-p", "0.9", "--min-p", "0.01", "--repetition-penalty", "1.2",
            "--presence-penalty", "0.1", "--frequency-penalty", "0.2", "--stop", "zzz", "--quant", "int8",
            "--dtype", "float32", "--kv-cache-dtype", "bfloat16", "--device", "cpu", "--threads", "1"]
    first = run(capsys, argv)
    assert first[0] == 0 and run(capsys, argv)[1] == first[1]


def test_bench_json_and_table(capsys, model):
    code, out, _ = run(capsys, ["bench", "--model", model, "-p", "16", "-n", "4", "-r", "2", "--json"])
    assert code == 0
    rows = json.loads(out)
    assert [r["test"] for r in rows] == ["pp16", "tg4"]
    assert all(r["avg_ts"] > 0 and len(r["samples_ts"]) == 2 for r in rows)
    code, out, _ = run(capsys, ["bench", "--model", model, "-p", "8", "-n", "2", "-r", "1"])
    assert code == 0
    assert re.search(r"\|\s+pp8 \|\s+[\d.]+ ± [\d.]+ \|", out) and re.search(r"\|\s+tg2 \|", out), out


def test_chat_multi_turn_reset_and_ctrl_c(capsys, model, monkeypatch):
    lines = iter(["Hello there", "How are you?", "/reset", "interrupt me", "Hello there", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    seen = []
    real_chat = LLM.chat

    def chat(self, messages, stream=False, **kw):
        seen.append([m["content"] for m in messages])
        if messages[-1]["content"] == "interrupt me":
            def pieces():
                yield "partial"
                raise KeyboardInterrupt
            return pieces()
        return real_chat(self, messages, stream=stream, **kw)

    monkeypatch.setattr(LLM, "chat", chat)
    code, out, err = run(capsys, ["chat", "--model", model, "--system", "Be brief.", "--temperature", "0", "-n", "5"])
    assert code == 0
    assert seen[0] == ["Be brief.", "Hello there"]
    assert seen[1][:2] == ["Be brief.", "Hello there"] and seen[1][-1] == "How are you?" and len(seen[1]) == 4
    assert seen[2] == ["Be brief.", "interrupt me"]  # /reset dropped the first turns
    assert seen[3][:3] == ["Be brief.", "interrupt me", "partial"]  # the session survived Ctrl-C
    assert "partial [stopped]" in out


@pytest.mark.parametrize(
    "argv",
    [
        ["generate", "--model", "/nonexistent/model.gguf", "--prompt", "hi"],
        ["generate", "--prompt", "hi", "--temperature", "-1"],
        ["generate", "--prompt", "hi", "--top-p", "1.5"],
        ["generate", "--prompt", "hi", "--top-p", "abc"],
        ["generate", "--prompt", "hi", "-n", "0"],
        ["generate", "--prompt", "hi", "--quant", "int3"],
        ["generate"],
        ["bench", "-r", "0"],
        ["fly"],
    ],
)
def test_bad_input_is_one_line_and_nonzero(capsys, argv):
    try:
        code = main(argv)
    except SystemExit as e:  # argparse errors exit through SystemExit (status 2)
        code = e.code
    assert_one_line_error(code, capsys.readouterr().err)


def test_prompt_longer_than_the_context(capsys, model):
    code, _, err = run(capsys, ["generate", "--model", model, "--prompt", "hello " * 100, "--max-seq-len", "32"])
    assert_one_line_error(code, err)
    assert "context" in err


def test_bench_longer_than_the_context(capsys, model):
    code, _, err = run(capsys, ["bench", "--model", model, "-p", "250", "-n", "10", "-r", "1"])
    assert_one_line_error(code, err)
    assert "context (256)" in err


def test_python_m_flashgen_entry_point(model):
    proc = subprocess.run([sys.executable, "-m", "flashgen", "generate", "--model", model, "--prompt", "Hi",
                           "--temperature", "0", "-n", "3", "--raw"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert STATS.match(proc.stderr.strip().splitlines()[-1])
    missing = subprocess.run([sys.executable, "-m", "flashgen", "generate", "--model", "/nope", "--prompt", "x"],
                             capture_output=True, text=True, timeout=300)
    assert_one_line_error(missing.returncode, missing.stderr)
