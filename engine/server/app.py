"""The OpenAI-compatible HTTP API over one loaded model (FastAPI).

    app = build_app(llm, ServerConfig(served_model_name="smollm2"))
    uvicorn.run(app, host="127.0.0.1", port=8000)

Endpoints: POST /v1/completions, /v1/chat/completions (server-sent events with `stream`, ending in
`data: [DONE]`), GET /v1/models, /health, /metrics, POST /tokenize, /detokenize. Every error a client can
cause is a 4xx in OpenAI's shape {"error": {"message", "type", "param", "code"}}; 503 when the queue is full.
A request whose client disconnects is aborted before the next engine step.
"""
import asyncio
import hmac
import json
import logging
import re
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from ..structured import GrammarError, Grammars
from ..tokenizer import ChatTemplateError
from . import protocol as P
from .async_engine import AsyncEngine
from .metrics import CONTENT_TYPE, Metrics
from .responses import Choices

log = logging.getLogger("flashgen")

_UNION_MEMBER = re.compile(r"str|int|bool|float|dict|list\[.*\]|.*\[.*\]")
# How often a non-streaming handler checks whether its client is still there.
_DISCONNECT_POLL_S = 0.1


@dataclass
class ServerConfig:
    """served_model_name: the name clients pass as `model`. max_queue: requests waiting beyond the running
    ones before new ones get a 503. max_body_bytes: request bodies beyond it get a 413. api_key: clients must
    send `Authorization: Bearer <api_key>` (every route but /health and /metrics)."""

    served_model_name: str = "flashgen"
    max_queue: int = 64
    max_body_bytes: int = 4 * 2 ** 20
    api_key: str | None = None


def build_app(llm, config: ServerConfig):
    """The FastAPI app serving `llm` (an engine.llm.LLM, whose engine the app takes over)."""
    state = _State(llm, config)

    @asynccontextmanager
    async def lifespan(app):
        state.engine.start()
        yield
        state.engine.stop()

    app = FastAPI(title="flashgen", lifespan=lifespan)
    app.state.flashgen = state
    app.add_middleware(_Guard, state=state)
    _add_error_handlers(app)

    @app.get("/health")
    async def health():
        if not state.engine.alive:
            return _error(P.RequestError("the engine thread has stopped", status=503, type="server_error"))
        return Response(status_code=200)

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": config.served_model_name, "object": "model",
                                            "created": state.created, "owned_by": "flashgen",
                                            "max_model_len": state.max_seq_len}]}

    @app.post("/v1/completions")
    async def completions(body: P.CompletionRequest, request: Request):
        prompts = state.completion_prompts(body)
        params = state.sampling_params(body, len(prompts), body.max_tokens, body.logprobs)
        return await state.serve(request, body, prompts, params, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: P.ChatCompletionRequest, request: Request):
        prompt = state.chat_prompt(body.messages, body.add_generation_prompt)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        params = state.sampling_params(body, 1, max_tokens, logprobs)
        return await state.serve(request, body, [prompt], params, chat=True)

    @app.post("/tokenize")
    async def tokenize(body: P.TokenizeRequest):
        state.check_model(body.model)
        if body.messages is not None:
            ids = state.chat_prompt(body.messages, body.add_generation_prompt)
        else:
            ids = state.tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        return {"tokens": ids, "count": len(ids), "max_model_len": state.max_seq_len}

    @app.post("/detokenize")
    async def detokenize(body: P.DetokenizeRequest):
        state.check_model(body.model)
        state.check_token_ids(body.tokens, "tokens")
        return {"prompt": state.tokenizer.decode(body.tokens)}

    return app


class _State:
    """What the handlers share: the model's tokenizer, the engine thread, metrics and limits."""

    def __init__(self, llm, config):
        self.config = config
        self.tokenizer, self.llm = llm.tokenizer, llm
        self.max_seq_len, self.vocab_size = llm.max_seq_len, llm.config.vocab_size
        self.max_num_seqs = llm.engine.scheduler.max_num_seqs
        self.metrics = Metrics(config.served_model_name)
        self.engine = AsyncEngine(llm.engine, self.metrics)
        self.metrics.stats = lambda: self.engine.stats
        self.created = int(time.time())
        self._grammars = None

    # ------------------------------------------------------------------ request checks
    def check_model(self, name):
        if name is not None and name != self.config.served_model_name:
            raise P.RequestError(f"the model {name!r} does not exist; this server serves "
                                 f"{self.config.served_model_name!r}", param="model", code="model_not_found")

    def check_token_ids(self, ids, param):
        bad = next((t for t in ids if t >= self.vocab_size), None)
        if bad is not None:
            raise P.RequestError(f"token id {bad} is out of range: the vocabulary has {self.vocab_size} tokens",
                                 param=param)

    def check_length(self, ids, param):
        if not ids:
            raise P.RequestError("the prompt is empty (no tokens)", param=param)
        if len(ids) >= self.max_seq_len:
            raise P.RequestError(f"This model's maximum context length is {self.max_seq_len} tokens. However, "
                                 f"your prompt has {len(ids)} tokens, which leaves no room for a completion. "
                                 f"Please reduce the length of the prompt.", param=param,
                                 code="context_length_exceeded")

    def completion_prompts(self, body):
        self.check_model(body.model)
        prompt = body.prompt
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            prompt = [prompt]
        if not prompt:
            raise P.RequestError("the prompt is empty (no tokens)", param="prompt")
        prompts = [self.tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompt]
        for ids in prompts:
            self.check_token_ids(ids, "prompt")
            self.check_length(ids, "prompt")
        return prompts

    def chat_prompt(self, messages, add_generation_prompt=True):
        try:
            text = self.tokenizer.apply_chat_template([m.as_template_input() for m in messages],
                                                      add_generation_prompt=add_generation_prompt)
        except ChatTemplateError as e:
            raise P.RequestError(str(e), param="messages") from None
        except ValueError as e:  # no chat template
            raise P.RequestError(f"this model cannot chat: {e}; use /v1/completions", param="messages") from None
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        self.check_length(ids, "messages")
        return ids

    def sampling_params(self, body, num_prompts, max_tokens, logprobs):
        self.check_model(body.model)
        if body.n > self.max_num_seqs:
            raise P.RequestError(f"n must be at most {self.max_num_seqs} (the server's --max-num-seqs), got "
                                 f"{body.n}", param="n")
        try:
            return body.sampling_params(max_tokens or self.max_seq_len, logprobs)
        except ValueError as e:
            raise P.RequestError(str(e)) from None

    def constraint(self, body):
        fmt = body.response_format
        if fmt is None or fmt.type == "text":
            return None
        if self._grammars is None:
            self._grammars = Grammars(self.tokenizer, self.vocab_size)
        try:
            if fmt.type == "json_object":
                return self._grammars.json_object()
            return self._grammars.json_schema(fmt.json_schema.schema_)
        except GrammarError as e:
            raise P.RequestError(str(e), param="response_format") from None

    # ------------------------------------------------------------------ generation
    async def serve(self, request, body, prompts, params, chat):
        """Submit one engine request per prompt and answer with a stream of events or one JSON body."""
        if not self.engine.alive:
            raise P.RequestError("the engine has stopped", status=503, type="server_error")
        if self.engine.num_requests + len(prompts) > self.max_num_seqs + self.config.max_queue:
            raise P.RequestError(f"the server is busy: {self.engine.num_requests} requests in flight; retry later",
                                 status=503, type="server_error", code="queue_full")
        constraint = self.constraint(body)
        kind = "chatcmpl" if chat else "cmpl"
        response_id = f"{kind}-{uuid.uuid4().hex}"
        ids = [f"{response_id}-{i}" for i in range(len(prompts))]
        queues = []
        try:
            for rid, prompt in zip(ids, prompts):
                queues.append(await self.engine.submit(rid, prompt, params, constraint))
        except ValueError as e:
            for rid in ids:
                self.engine.abort(rid)
            raise P.RequestError(str(e)) from None
        choices = Choices(self.tokenizer, chat, params, len(prompts), response_id,
                          self.config.served_model_name, self.created)
        events = _merged(queues)
        if body.stream:
            return StreamingResponse(self._stream(events, choices, ids, body.include_usage),
                                     media_type="text/event-stream")
        return await self._collect(request, events, choices, ids)

    async def _stream(self, events, choices, ids, include_usage):
        try:
            if choices.chat:
                yield _sse(choices.role_chunk(include_usage))
            async for prompt_index, outputs, finished in events:
                chunk = choices.add(prompt_index, outputs, finished)
                if finished is not None and finished.error:
                    yield _sse(P.error_body(finished.error, type="server_error"))
                    return
                if chunk["choices"]:
                    if include_usage:
                        chunk["usage"] = None
                    yield _sse(chunk)
            if include_usage:
                yield _sse(choices.usage_chunk())
            yield "data: [DONE]\n\n"
        finally:  # the client went away (cancelled) or the stream ended: abort what still runs
            for rid in ids:
                self.engine.abort(rid)

    async def _collect(self, request, events, choices, ids):
        task = asyncio.current_task()
        watcher = asyncio.create_task(_cancel_on_disconnect(request, task))
        try:
            async for prompt_index, outputs, finished in events:
                choices.add(prompt_index, outputs, finished)
                if finished is not None and finished.error:
                    raise P.RequestError(finished.error, status=500, type="server_error")
            return JSONResponse(choices.response())
        except asyncio.CancelledError:
            if not watcher.done() or watcher.cancelled():  # cancelled by the server (shutdown), not the client
                raise
            task.uncancel()
            return Response(status_code=499)  # nobody is listening
        finally:
            watcher.cancel()
            for rid in ids:
                self.engine.abort(rid)


async def _merged(queues):
    """(prompt index, outputs, finished) items of several requests' queues, as they come, until all finish."""
    pending = {asyncio.ensure_future(q.get()): i for i, q in enumerate(queues)}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in sorted(done, key=pending.get):
                i = pending.pop(task)
                outputs, finished = task.result()
                yield i, outputs, finished
                if finished is None:
                    pending[asyncio.ensure_future(queues[i].get())] = i
    finally:
        for task in pending:
            task.cancel()


async def _cancel_on_disconnect(request, task):
    """Cancel `task` (a non-streaming handler) once its client has disconnected."""
    while not await request.is_disconnected():
        await asyncio.sleep(_DISCONNECT_POLL_S)
    task.cancel()


def _sse(obj):
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _error(e: P.RequestError):
    return JSONResponse(P.error_body(str(e), e.type, e.param, e.code), status_code=e.status)


def _add_error_handlers(app):
    @app.exception_handler(P.RequestError)
    async def request_error(request, e):
        return _error(e)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, e):
        first = e.errors()[0]
        # The location without "body" and without the names pydantic gives the members of a union.
        loc = [str(x) for x in first.get("loc", ()) if x != "body" and not _UNION_MEMBER.fullmatch(str(x))]
        text = first["msg"].removeprefix("Value error, ")
        if first.get("type") == "json_invalid":
            message, param = f"the body is not valid JSON: {first.get('ctx', {}).get('error', text)}", None
        else:
            param = ".".join(loc) or None
            message = f"{param}: {text}" if param else text
        return _error(P.RequestError(message, param=param, code=first.get("type")))

    @app.exception_handler(HTTPException)
    async def http_error(request, e):
        return JSONResponse(P.error_body(str(e.detail), "invalid_request_error"), status_code=e.status_code,
                            headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def server_error(request, e):  # a bug: logged, answered in the same shape
        log.exception("request failed")
        return JSONResponse(P.error_body(f"internal error: {type(e).__name__}", "server_error"), status_code=500)


class _Guard:
    """ASGI middleware: the API key and the body size limit, checked before FastAPI reads the body."""

    _OPEN = ("/health", "/metrics")

    def __init__(self, app, state):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        config = self.state.config
        headers = dict(scope["headers"])
        if config.api_key is not None and scope["path"] not in self._OPEN:
            given = headers.get(b"authorization", b"")
            expected = f"Bearer {config.api_key}".encode()
            if not hmac.compare_digest(given, expected):
                return await _send(send, 401, P.error_body("invalid or missing API key (Authorization: Bearer ...)",
                                                           "authentication_error", code="invalid_api_key"))
        limit = config.max_body_bytes
        try:
            declared = int(headers.get(b"content-length", b"0"))
        except ValueError:
            declared = 0
        if declared > limit:
            return await _send(send, 413, _too_large(limit))
        received = 0

        async def limited_receive():  # a chunked body declares no length
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise HTTPException(413, _too_large(limit)["error"]["message"])
            return message

        await self.app(scope, limited_receive, send)


def _too_large(limit):
    return P.error_body(f"the request body is larger than {limit} bytes", code="body_too_large")


async def _send(send, status, body):
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})
