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


SAMPLED = ["--prompt", "The quick", "-n", "10", "--seed", "7", "--temperature", "1.1", "--top-k", "0", "--top-p",
           "0.9", "--min-p", "0.01", "--repetition-penalty", "1.2", "--presence-penalty", "0.1",
           "--frequency-penalty", "0.2", "--raw"]


def test_sampling_options_are_reproducible_and_change_the_output(capsys, model):
    def text(*options):
        code, out, err = run(capsys, ["generate", "--model", model, *SAMPLED, *options])
        assert code == 0, err
        return out.removesuffix("\n")

    sampled = text("--stop", "zzz", "--quant", "int8", "--dtype", "float32", "--kv-cache-dtype", "bfloat16",
                   "--device", "cpu", "--threads", "1")
    assert text("--stop", "zzz", "--quant", "int8", "--dtype", "float32", "--kv-cache-dtype", "bfloat16",
                "--device", "cpu", "--threads", "1") == sampled
    base = text()
    greedy = text("--temperature", "0")
    assert text("--seed", "8") != base
    assert base != greedy and text("--top-k", "1") == greedy  # one candidate left: the argmax
    assert text("--repetition-penalty", "1.0", "--presence-penalty", "0", "--frequency-penalty", "0",
                "--temperature", "0") != greedy
    assert base.startswith(text("-n", "4")) and len(text("-n", "4")) < len(base)  # one random draw per step
    stop = base[len(base) // 2:len(base) // 2 + 2]
    assert text("--stop", stop) == base[:base.index(stop)]


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
    "argv, code, message",
    [
        (["generate", "--model", "/nonexistent/model.gguf", "--prompt", "hi"], 1,
         r"flashgen generate: error: model '/nonexistent/model\.gguf' not found"),
        (["generate", "--prompt", "hi", "--temperature", "-1"], 1,
         r"flashgen generate: error: temperature must be a number >= 0 .*got -1\.0"),
        (["generate", "--prompt", "hi", "--top-p", "1.5"], 1,
         r"flashgen generate: error: top_p must be in \(0, 1\] .*got 1\.5"),
        (["generate", "--prompt", "hi", "--top-p", "abc"], 2,
         r"flashgen generate: error: argument --top-p: invalid float value: 'abc'"),
        (["generate", "--prompt", "hi", "-n", "0"], 2,
         r"flashgen generate: error: argument --max-new-tokens/-n: expected a positive integer, got '0'"),
        (["generate", "--prompt", "hi", "--quant", "int3"], 2,
         r"flashgen generate: error: argument --quant: invalid choice: 'int3'"),
        (["generate"], 2, r"flashgen generate: error: the following arguments are required: --prompt/-p"),
        (["bench", "-r", "0"], 2,
         r"flashgen bench: error: argument -r/--repetitions: expected a positive integer, got '0'"),
        (["fly"], 2, r"flashgen: error: argument command: invalid choice: 'fly'"),
    ],
)
def test_bad_input_is_one_line_and_nonzero(capsys, argv, code, message):
    try:
        got = main(argv)
    except SystemExit as e:  # argparse errors exit through SystemExit (status 2)
        got = e.code
    err = capsys.readouterr().err
    assert_one_line_error(got, err)
    assert got == code and re.match(message, err), (got, err)


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
