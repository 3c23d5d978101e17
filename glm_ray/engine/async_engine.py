"""The engine for servers: many concurrent request streams over one background step loop.

The loop runs in its own thread (a step is blocking torch work and must not stall the event
loop); requests and aborts reach it through a queue. That thread is the one that should own
torch's intra-op (OpenMP) threads: `num_threads` is set on it. libgomp keeps a team of worker
threads per thread that ever ran a parallel region, and once a process holds more such threads
than cores it stops spinning between regions, so every small op pays a futex wake-up (~80 us on
a 2-core VM): an engine thread whose process had already run parallel torch ops elsewhere (a
server's loading thread) ran decode at 0.65x of the same engine on the main thread. Load with
torch at one thread (`torch.set_num_threads(1)`) and give the engine its threads here.

Deltas come back either to each request's asyncio queue on the caller's loop (`generate`), or, for
a server that multiplexes many requests on one connection, to a `DeltaSink` that gets all of its
requests' deltas of a step in one call (`submit`): one message a step for the connection instead
of one per request.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Protocol

from glm_ray.engine.config import EngineOptions
from glm_ray.engine.llm_engine import LLMEngine
from glm_ray.engine.outputs import RequestDelta
from glm_ray.engine.request import Resume
from glm_ray.engine.sampling_params import SamplingParams
from glm_ray.experts.backend import ExpertBackend

log = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The step loop has stopped; the request cannot complete."""


class EngineFullError(EngineDeadError):
    """The engine's waiting list is at `max_waiting_requests`: nothing was started, so the request
    may go to another replica (a subclass of EngineDeadError for that reason)."""


class DeltaSink(Protocol):
    """Where `submit`ted requests' output goes; called on the engine thread, so keep it quick."""

    def deliver(self, deltas: list[RequestDelta]) -> None:
        """This step's deltas of this sink's requests (a whole request's only when it finishes)."""

    def fail(self, request_id: str, error: BaseException) -> None:
        """The request ended without finishing (added while the engine failed, a step failed, shutdown)."""


class AsyncLLMEngine:
    def __init__(self, model: str | Path, options: EngineOptions | None = None, experts: ExpertBackend | None = None,
                 num_threads: int | None = None):
        """num_threads: torch's intra-op threads for the step loop (None: leave torch's setting)."""
        self.engine = LLMEngine(model, options, experts)
        self.num_threads = num_threads
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        # request id -> (its caller's loop and queue, or None and its DeltaSink; deltas held back
        # for a whole-request client)
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop | None, asyncio.Queue | DeltaSink, list | None]] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="glm-ray-engine", daemon=True)
        self._thread.start()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def _check_room(self) -> None:
        """EngineFullError when the waiting list (and what is on its way to it) is at the limit."""
        limit = self.engine.options.max_waiting_requests
        if limit is not None and len(self.engine.scheduler.waiting) + self._commands.qsize() >= limit:
            raise EngineFullError(f"this engine's waiting list is full ({limit} requests, max_waiting_requests); "
                                  "retry shortly or on another replica")

    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                       prompt: str | None = None, whole: bool = False,
                       resume: Resume | None = None) -> AsyncIterator[RequestDelta]:
        """Stream the request's deltas; the last one has a finish_reason. Invalid requests raise
        ValueError before anything is streamed. Leaving the iterator early aborts the request.
        `whole`: yield one delta, the finished request, for clients that do not stream: the step
        loop keeps the deltas and hands over only that one (one wake-up instead of one a token).
        `resume`: continue a request another engine started (engine/request.py)."""
        self.engine.validate(prompt_token_ids, params, resume)
        if self._stopped:
            raise EngineDeadError("the engine is shut down")
        self._check_room()
        stream: asyncio.Queue = asyncio.Queue()
        with self._lock:
            if request_id in self._streams:
                raise ValueError(f"request id {request_id!r} is already running")
            self._streams[request_id] = (asyncio.get_running_loop(), stream, [] if whole else None)
        self._commands.put(("add", request_id, prompt_token_ids, params, prompt, resume))
        self._wake.set()
        finished = False
        try:
            while True:
                item = await stream.get()
                # a consumer that fell behind gets what piled up as one delta: one message per
                # wake-up instead of one per step (streaming costs per message, not per token)
                while not isinstance(item, BaseException) and not item.finished and not stream.empty():
                    later = stream.get_nowait()
                    item = later if isinstance(later, BaseException) else item.then(later)
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            if not finished:
                self.abort(request_id)

    def submit(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, sink: DeltaSink,
               prompt: str | None = None, whole: bool = False, resume: Resume | None = None) -> None:
        """Add a request whose deltas go to `sink` (batched per step with the sink's other requests);
        `whole`: only the finished request, as one delta; `resume`: as in `generate`. Raises
        ValueError for an invalid request."""
        self.engine.validate(prompt_token_ids, params, resume)
        if self._stopped:
            raise EngineDeadError("the engine is shut down")
        self._check_room()
        with self._lock:
            if request_id in self._streams:
                raise ValueError(f"request id {request_id!r} is already running")
            self._streams[request_id] = (None, sink, [] if whole else None)
        self._commands.put(("add", request_id, prompt_token_ids, params, prompt, resume))
        self._wake.set()

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._streams.pop(request_id, None)
        self._commands.put(("abort", request_id))
        self._wake.set()

    def shutdown(self) -> None:
        self._stopped = True
        self._wake.set()
        self._thread.join(timeout=10)

    def num_running(self) -> int:
        with self._lock:
            return len(self._streams)

    # --- the engine thread ------------------------------------------------------------------

    def _deliver(self, request_id: str, item, batches: dict | None = None) -> None:
        """Hand `item` (a delta or an exception) to the request's consumer; a sink's deltas are
        collected in `batches` (sink -> deltas) for one call at the end of the step."""
        with self._lock:
            target = self._streams.get(request_id)
            if target is not None and (not isinstance(item, RequestDelta) or item.finished):
                self._streams.pop(request_id, None)
        if target is None:
            return
        loop, stream, held = target
        if held is not None and isinstance(item, RequestDelta):  # a whole-request client
            held.append(item)
            if not item.finished:
                return
            item = RequestDelta.concat(held)
        if loop is not None:
            loop.call_soon_threadsafe(stream.put_nowait, item)
        elif batches is not None and not isinstance(item, BaseException):
            batches.setdefault(id(stream), (stream, []))[1].append(item)
        else:
            _to_sink(stream, request_id, item)

    def _drain_commands(self) -> None:
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return
            if cmd[0] == "abort":
                self.engine.abort(cmd[1])
                continue
            _, request_id, ids, params, prompt, resume = cmd
            with self._lock:
                wanted = request_id in self._streams  # aborted before it was added
            if not wanted:
                continue
            try:
                self.engine.add_request(request_id, ids, params, prompt, resume)
            except ValueError as e:
                self._deliver(request_id, e)

    def _loop(self) -> None:
        if self.num_threads is not None:
            import torch

            torch.set_num_threads(self.num_threads)
        while not self._stopped:
            self._drain_commands()
            if not self.engine.has_unfinished():
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            try:
                deltas = self.engine.step()
            except Exception as e:  # fail the step's requests; queued ones stay queued, new ones are served
                for request_id in self.engine.running_request_ids():
                    self.engine.abort(request_id)
                    self._deliver(request_id, EngineStepError(f"engine step failed: {e!r}"))
                continue
            batches: dict[int, tuple[DeltaSink, list[RequestDelta]]] = {}
            for delta in deltas:
                self._deliver(delta.request_id, delta, batches)
            for sink, batch in batches.values():
                _to_sink(sink, None, batch)
        for request_id in list(self._streams):
            self._deliver(request_id, EngineDeadError("the engine was shut down"))


def _to_sink(sink: DeltaSink, request_id: str | None, item) -> None:
    """A sink that fails (its connection gone) must not stop the step loop."""
    try:
        if isinstance(item, BaseException):
            sink.fail(request_id, item)
        else:
            sink.deliver(item if isinstance(item, list) else [item])
    except Exception as e:  # noqa: BLE001
        log.warning("a delta sink failed: %r", e)


class EngineStepError(RuntimeError):
    """A step failed (e.g. an expert backend error); the affected requests fail, the engine goes on."""
