"""The engine in a thread of its own, fed from an asyncio event loop.

Engine (engine/engine.py) is not thread-safe, so every call into it happens on the engine thread: requests
are added and aborted through a command queue that the thread drains between steps (the caller awaits the
result, so a bad request still fails in its own handler). After each step the thread hands the step's
outputs to the event loop in one call, where each request's asyncio.Queue receives its share. A request is
released from the engine as soon as its last sample finishes, so its blocks go back at once.
"""
import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

log = logging.getLogger("flashgen")


@dataclass
class Finished:
    """The last item of a request's stream: token counts for usage."""

    num_prompt_tokens: int
    num_cached_tokens: int
    num_output_tokens: list  # per sample
    error: str | None = None  # set when the engine failed, not the request


@dataclass
class _Stream:
    queue: asyncio.Queue
    arrival: float
    last_token: dict = field(default_factory=dict)  # sample index -> time of its last token


class AsyncEngine:
    """submit() a request, read (outputs, finished) items from its queue; abort() when the client leaves.

    metrics (engine/server/metrics.py), if given, observes latencies on the event loop; `stats` is a
    snapshot of the engine's counters, refreshed by the engine thread after every step.
    """

    def __init__(self, engine, metrics=None):
        self.engine, self.metrics = engine, metrics
        self.loop = None
        self._commands = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stopping = False
        self._streams = {}  # request id -> _Stream; touched on the event loop only
        self._thread = threading.Thread(target=self._run, name="flashgen-engine", daemon=True)
        self.stats = self._snapshot()
        self.error = None  # the exception that stopped the engine thread, if any

    # ------------------------------------------------------------------ event loop side
    def start(self, loop=None):
        self.loop = loop or asyncio.get_running_loop()
        self._thread.start()

    def stop(self):
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout=30)

    @property
    def alive(self):
        return self._thread.is_alive()

    @property
    def num_requests(self):
        """Requests submitted and not yet finished (running or waiting)."""
        return len(self._streams)

    async def submit(self, request_id, prompt_ids, params, constraint=None):
        """Queue a request; returns its asyncio.Queue of (list of StepOutput, Finished or None) items.
        Raises what Engine.add_request raises (ValueError for a request it refuses)."""
        stream = _Stream(asyncio.Queue(), time.perf_counter())
        self._streams[request_id] = stream
        try:
            await asyncio.wrap_future(self._call(self.engine.add_request, prompt_ids, params, request_id, constraint))
        except BaseException:
            self._streams.pop(request_id, None)
            raise
        return stream.queue

    def abort(self, request_id):
        """Stop a request (its client is gone): its blocks are freed before the next step."""
        if self._streams.pop(request_id, None) is not None:
            self._call(self.engine.release, request_id)

    def _call(self, fn, *args):
        future = concurrent.futures.Future()
        self._commands.put((fn, args, future))
        self._wake.set()
        return future

    def _deliver(self, by_request, finished):
        now = time.perf_counter()
        for rid, outputs in by_request.items():
            stream = self._streams.get(rid)
            if stream is None:  # aborted while the step ran
                continue
            if self.metrics is not None:
                for out in outputs:
                    last = stream.last_token.get(out.index)
                    self.metrics.observe_token(now - (stream.arrival if last is None else last), first=last is None)
                    stream.last_token[out.index] = now
            done = finished.get(rid)
            if done is not None:
                del self._streams[rid]
                if self.metrics is not None:
                    self.metrics.observe_request(now - stream.arrival)
            stream.queue.put_nowait((outputs, done))
        for rid, done in finished.items():  # failed before producing anything
            if rid not in by_request and (stream := self._streams.pop(rid, None)) is not None:
                stream.queue.put_nowait(([], done))

    # ------------------------------------------------------------------ engine thread
    def _run(self):
        while not self._stopping:
            self._wake.clear()
            self._run_commands()
            if not self.engine.has_unfinished():
                self.stats = self._snapshot()
                self._wake.wait()
                continue
            try:
                outputs = self.engine.step()
            except Exception as e:  # a bug, not a request: fail what runs, keep serving
                log.exception("engine step failed")
                self._fail_all(f"the engine failed: {type(e).__name__}: {e}")
                continue
            by_request, finished = {}, {}
            for out in outputs:
                by_request.setdefault(out.request_id, []).append(out)
            for rid in by_request:
                seqs = self.engine.sequences(rid)
                if all(s.finished for s in seqs):
                    finished[rid] = Finished(seqs[0].num_prompt_tokens, seqs[0].num_cached_prompt,
                                             [len(s.output_ids) for s in seqs])
                    self.engine.release(rid)
            self.stats = self._snapshot()
            self.loop.call_soon_threadsafe(self._deliver, by_request, finished)
        self._run_commands()

    def _run_commands(self):
        while True:
            try:
                fn, args, future = self._commands.get_nowait()
            except queue.Empty:
                return
            try:
                future.set_result(fn(*args))
            except Exception as e:
                future.set_exception(e)

    def _fail_all(self, message):
        finished = {}
        for rid in list(self.engine.requests):
            seqs = self.engine.sequences(rid)
            finished[rid] = Finished(seqs[0].num_prompt_tokens, 0, [len(s.output_ids) for s in seqs], message)
            self.engine.release(rid)
        self.stats = self._snapshot()
        self.loop.call_soon_threadsafe(self._deliver, {}, finished)

    def _snapshot(self):
        e = self.engine
        blocks = e.blocks
        queries, hits = e.prefix_cache_stats
        return dict(running=len({s.request_id for s in e.scheduler.running}),
                    waiting=len({s.request_id for s in e.scheduler.waiting}),
                    kv_usage=1 - blocks.num_free / len(blocks.blocks), free_blocks=blocks.num_free,
                    num_blocks=len(blocks.blocks), prefix_queries=queries, prefix_hits=hits,
                    prompt_tokens=e.num_prompt_tokens, generation_tokens=e.num_generated_tokens,
                    preemptions=e.scheduler.num_preemptions)
