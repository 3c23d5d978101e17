"""One long-lived `ForwardStream` to an expert replica (protos/glm_ray/v1/experts.proto).

A stream carries every MoE layer's request for that replica, so a layer pays one message each way
instead of a call's setup (a new HTTP/2 stream, headers, flow-control window): ~1 ms of a ~3 ms
round trip for a 300 KB request on this machine. Requests are written one at a time; the server
answers them in order, so each reply resolves the oldest waiting request. A stream that breaks,
or whose reply is overdue, fails every request on it with `CallFailed` and is not used again: the
caller retries those requests on another replica. Runs on the caller's event loop only.
"""

from __future__ import annotations

import asyncio
from collections import deque

import grpc

from glm_ray.experts.server import FORWARD_STREAM_METHOD
from glm_ray.v1 import experts_pb2 as pb

_STATUS = {code.value[0]: code for code in grpc.StatusCode}


class CallFailed(Exception):
    """A request got no reply, or a reply carrying an error status."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self.code, self.details = code, details


def _as_failure(e: BaseException) -> CallFailed:
    if isinstance(e, CallFailed):
        return e
    if isinstance(e, grpc.aio.AioRpcError):
        return CallFailed(e.code(), e.details() or "")
    return CallFailed(grpc.StatusCode.UNKNOWN, f"{type(e).__name__}: {e}")


async def _status_of(call, e: BaseException) -> CallFailed:
    try:
        code = await asyncio.wait_for(call.code(), 1.0)
        if code != grpc.StatusCode.OK:
            return CallFailed(code, await call.details() or "")
    except Exception:  # noqa: BLE001 - no status to be had: the write's own error
        pass
    return _as_failure(e)


class ReplicaStream:
    def __init__(self, channel: grpc.aio.Channel, metadata: tuple[tuple[str, str], ...] = ()):
        """metadata: sent once, when the stream opens (the cluster secret, experts/auth.py)."""
        self._call = channel.stream_stream(FORWARD_STREAM_METHOD,
                                           response_deserializer=pb.ForwardReply.FromString)(metadata=metadata)
        self._waiting: deque[asyncio.Future] = deque()  # in request order
        self._write_lock = asyncio.Lock()
        self.failure: CallFailed | None = None  # set once broken: the stream takes no more requests
        self._reader = asyncio.ensure_future(self._read())

    async def forward(self, payload: bytes, timeout: float) -> pb.ForwardReply:
        """Send one serialized ForwardRequest; its reply, or CallFailed."""
        reply = asyncio.get_running_loop().create_future()
        async with self._write_lock:  # one write at a time, queued in the order they wait
            if self.failure is not None:
                raise self._failed()
            self._waiting.append(reply)
            try:
                await self._call.write(payload)
            except asyncio.CancelledError:  # a half-written message leaves the stream unusable
                self._fail(CallFailed(grpc.StatusCode.CANCELLED, "a write was cancelled"))
                raise
            except Exception as e:  # noqa: BLE001 - the stream is unusable whatever broke it
                # a write racing the server's refusal fails with a core error: the call's own
                # status (UNAUTHENTICATED, say) is the one that says why
                self._fail(await _status_of(self._call, e))
        try:
            out = await asyncio.wait_for(reply, timeout)
        except asyncio.TimeoutError:
            # later replies on this stream would be matched to the wrong requests: drop it
            self._fail(CallFailed(grpc.StatusCode.DEADLINE_EXCEEDED, f"no reply within {timeout:g} s"))
            raise self._failed() from None
        if out.error_code:
            raise CallFailed(_STATUS.get(out.error_code, grpc.StatusCode.UNKNOWN), out.error)
        return out

    def close(self) -> None:
        self._fail(CallFailed(grpc.StatusCode.CANCELLED, "the stream was closed"))
        self._reader.cancel()

    async def _read(self) -> None:
        try:
            while True:
                reply = await self._call.read()
                if reply is grpc.aio.EOF:
                    raise CallFailed(grpc.StatusCode.UNAVAILABLE, "the replica ended the stream")
                if not self._waiting:
                    raise CallFailed(grpc.StatusCode.INTERNAL, "a reply that no request is waiting for")
                waiting = self._waiting.popleft()
                if not waiting.done():
                    waiting.set_result(reply)
        except asyncio.CancelledError:  # close(), or the call cancelled by _fail
            self._fail(CallFailed(grpc.StatusCode.CANCELLED, "the stream was closed"))
        except Exception as e:  # noqa: BLE001 - every waiting request gets it
            self._fail(_as_failure(e))

    def _fail(self, failure: CallFailed) -> None:
        if self.failure is None:
            self.failure = failure
            self._call.cancel()
        while self._waiting:
            waiting = self._waiting.popleft()
            if not waiting.done():
                waiting.set_exception(self._failed())
                waiting.exception()  # the awaiting request raises it; no "never retrieved" log

    def _failed(self) -> CallFailed:
        """A new exception for each request the failure reaches (one traceback each)."""
        return CallFailed(self.failure.code, self.failure.details)
