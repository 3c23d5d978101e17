"""The attention replica's end of the ingress channels (channel_wire.py): a gRPC server whose
every stream is one ingress replica's channel.

Requests go into the engine with `AsyncLLMEngine.submit`; each engine step hands a channel all of
its requests' deltas at once, and the channel writes them as one message (piled-up steps merge
into one write when the ingress reads slower than the engine steps). A channel that closes
aborts its running requests, so their KV blocks return. While the replica drains it refuses new
requests with a retryable error, and the ingress sends them to another replica.
Runs on its own event loop thread; the engine's step thread only enqueues.
"""

from __future__ import annotations

import asyncio
import logging

import grpc

from glm_ray.engine.async_engine import AsyncLLMEngine, EngineDeadError
from glm_ray.engine.outputs import RequestDelta
from glm_ray.engine.request import Resume
from glm_ray.engine.sampling_params import SamplingParams
from glm_ray.experts.auth import DispatchAuth
from glm_ray.serving import channel_wire as wire
from glm_ray.serving.protocol import delta_to_dict

log = logging.getLogger(__name__)


class _ChannelSink:
    """The engine thread's way into one channel's loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, outbox: asyncio.Queue):
        self.loop, self.outbox = loop, outbox

    def deliver(self, deltas: list[RequestDelta]) -> None:
        self.loop.call_soon_threadsafe(self.outbox.put_nowait, ("deltas", deltas))

    def fail(self, request_id: str, error: BaseException) -> None:
        self.loop.call_soon_threadsafe(self.outbox.put_nowait, ("failed", request_id, error))


class AttentionChannelServer:
    def __init__(self, engine: AsyncLLMEngine, auth: DispatchAuth | None = None):
        self.engine = engine
        self.auth = auth or DispatchAuth()
        self.draining = False  # refuse new requests (retryable): this replica is going away
        self.num_messages = 0  # reply messages written, all channels
        self._running: dict[str, asyncio.Queue] = {}  # request id -> its channel's outbox
        self._server: grpc.aio.Server | None = None

    def running(self) -> int:
        return len(self._running)

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)], interceptors=self.auth.server_interceptors() or None)
        handler = grpc.stream_stream_rpc_method_handler(self._open)  # bytes in, bytes out
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(wire.SERVICE, {"Open": handler}),))
        credentials = self.auth.server_credentials()
        bind = f"{host}:{port}"
        bound = server.add_secure_port(bind, credentials) if credentials else server.add_insecure_port(bind)
        if bound == 0:
            raise OSError(f"attention channel: cannot bind {bind}")
        await server.start()
        self._server = server
        return f"{host}:{bound}"

    async def fail_all(self, message: str) -> int:
        """Stop every running request (the drain limit ran out): the ingress resumes a streamed
        one on another replica, else the client gets a retryable error."""
        ids = list(self._running)
        for request_id in ids:
            self.engine.abort(request_id)
            outbox = self._running.pop(request_id, None)
            if outbox is not None:
                outbox.put_nowait(("error", wire.error(request_id, wire.UNAVAILABLE, message, retry=False,
                                                       resumable=True)))
        return len(ids)

    async def stop(self, grace_s: float = 1.0) -> None:
        if self._server is not None:
            await self._server.stop(grace_s)
            self._server = None

    # -- one channel ----------------------------------------------------------------------------

    async def _open(self, commands, context):
        outbox: asyncio.Queue = asyncio.Queue()
        sink = _ChannelSink(asyncio.get_running_loop(), outbox)
        mine: set[str] = set()  # this channel's running requests
        started: set[str] = set()  # ...that have sent something (no longer safe to send elsewhere)
        reader = asyncio.ensure_future(self._read(commands, sink, outbox, mine))
        closed = False
        try:
            while not (closed and not mine):
                items = [await outbox.get()]
                while not outbox.empty():  # what piled up while the client was slow: one message
                    items.append(outbox.get_nowait())
                deltas, errors = [], []
                for item in items:
                    kind = item[0]
                    if kind == "deltas":
                        for d in item[1]:
                            if d.request_id not in mine:
                                continue  # aborted meanwhile
                            deltas.append(delta_to_dict(d))
                            started.add(d.request_id)
                            if d.finished:
                                self._finish(d.request_id, mine)
                    elif kind == "failed":
                        _, request_id, e = item
                        if request_id in mine:
                            retry = request_id not in started and isinstance(e, EngineDeadError)
                            errors.append(wire.error(request_id, wire.UNAVAILABLE, f"{type(e).__name__}: {e}", retry))
                            self._finish(request_id, mine)
                    elif kind == "error":
                        errors.append(item[1])
                        mine.discard(item[1]["request_id"])
                    elif kind == "closed":
                        closed = True
                if deltas or errors:
                    self.num_messages += 1
                    yield wire.replies(deltas, errors)
        finally:
            reader.cancel()
            for request_id in list(mine):  # the ingress went away: free the requests' KV blocks
                self.engine.abort(request_id)
                self._finish(request_id, mine)

    def _finish(self, request_id: str, mine: set[str]) -> None:
        mine.discard(request_id)
        self._running.pop(request_id, None)

    async def _read(self, commands, sink: _ChannelSink, outbox: asyncio.Queue, mine: set[str]) -> None:
        try:
            async for data in commands:
                try:
                    msg = wire.decode_command(data)
                except ValueError as e:
                    log.warning("attention channel: dropped a malformed message: %s", e)
                    continue
                if msg["op"] == "abort":
                    if msg["request_id"] in mine:
                        self.engine.abort(msg["request_id"])
                        self._finish(msg["request_id"], mine)
                    continue
                self._submit(msg["request"], sink, outbox, mine)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - the stream broke: the writer's finally aborts
            log.info("attention channel closed: %r", e)
        outbox.put_nowait(("closed",))

    def _submit(self, request: dict, sink: _ChannelSink, outbox: asyncio.Queue, mine: set[str]) -> None:
        request_id = request["request_id"]
        if self.draining:
            outbox.put_nowait(("error", wire.error(request_id, wire.UNAVAILABLE, "this attention replica is "
                                                   "draining", retry=True)))
            return
        try:
            params = SamplingParams(**(request.get("sampling_params") or {}))
            resume = Resume.from_dict(request["resume"]) if request.get("resume") else None
            mine.add(request_id)
            self._running[request_id] = outbox
            self.engine.submit(request_id, list(request["prompt_token_ids"]), params, sink, request.get("prompt"),
                               whole=request.get("stream") is False, resume=resume)
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            self._finish(request_id, mine)
            outbox.put_nowait(("error", wire.error(request_id, wire.BAD_REQUEST, str(e), retry=False)))
        except EngineDeadError as e:
            self._finish(request_id, mine)
            outbox.put_nowait(("error", wire.error(request_id, wire.UNAVAILABLE, str(e), retry=True)))
