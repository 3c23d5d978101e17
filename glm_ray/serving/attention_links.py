"""The ingress's end of the channels to attention replicas (channel_wire.py): one gRPC stream per
attention replica, shared by every request this ingress replica sends there.

A request goes to the replica with the fewest of this ingress's requests in flight; its deltas
come back on that replica's stream, several requests' in one message. Leaving the iterator early
(the client went away) sends an abort. A request refused before it produced anything (the replica
is draining, its engine is down, its stream broke) is sent to another replica. A streamed request
cut after it produced tokens (its replica was lost, or ran out of drain time) is resumed on
another one: the ingress keeps the token ids it has passed on and the length of their text, and
sends the request again with them (`resume`, engine/request.py); that replica computes prompt +
those tokens and goes on from the next position, so the client reads one continuous stream (no
token twice or missing, usage counted once by the engine that finishes it). Greedy outputs are
those of an undisturbed run, seeded sampling's too; an unseeded sampled request continues with
other draws. The table of replicas (replica id -> address) comes from the router, re-read every
`refresh_s`. Runs on the ingress's event loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc

from glm_ray.experts.auth import DispatchAuth
from glm_ray.serving import channel_wire as wire
from glm_ray.serving.protocol import merge_delta_dicts

log = logging.getLogger(__name__)
MAX_ATTEMPTS = 4  # replicas one request may be sent to, resumes included


class AttentionUnavailable(RuntimeError):
    """No attention replica could take or finish the request; retryable (503)."""


class _Link:
    """One stream to one attention replica; requests' queues by id."""

    def __init__(self, address: str, channel: grpc.aio.Channel, metadata):
        self.address = address
        self.channel = channel
        self.call = channel.stream_stream(wire.OPEN_METHOD)(metadata=metadata)  # bytes both ways
        self.queues: dict[str, asyncio.Queue] = {}
        self.broken: str | None = None
        # writes go through one task: gRPC takes one write at a time on a stream, and a write cut
        # half-way (a request's task cancelled when its client leaves) would leave the stream unusable
        self._outbox: asyncio.Queue = asyncio.Queue()
        self.writer = asyncio.ensure_future(self._write())
        self.reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        try:
            async for data in self.call:
                deltas, errors = wire.decode_replies(data)
                for d in deltas:
                    queue = self.queues.get(d["request_id"])
                    if queue is not None:
                        queue.put_nowait(("delta", d))
                for e in errors:
                    queue = self.queues.get(e["request_id"])
                    if queue is not None:
                        queue.put_nowait(("error", e))
        except Exception:  # noqa: BLE001 - how it ended is read from the call's status below
            pass
        try:  # the call's own status, whichever way the stream ended (a refused one may raise anything)
            code = await self.call.code()
            reason = ("the attention replica closed the channel" if code == grpc.StatusCode.OK
                      else f"{code.name}: {await self.call.details()}")
        except Exception as e:  # noqa: BLE001
            reason = repr(e)
        self.broken = reason
        for queue in self.queues.values():
            queue.put_nowait(("lost", reason))

    def send(self, message: bytes) -> None:
        """Queue a message for the stream (never blocks, so never cut by a cancelled caller)."""
        if self.broken is not None:
            raise ConnectionError(self.broken)
        self._outbox.put_nowait(message)

    async def _write(self) -> None:
        while True:
            message = await self._outbox.get()
            try:
                await self.call.write(message)
            except Exception as e:  # noqa: BLE001 - the stream is gone: the reader reports it to the requests
                self.broken = self.broken or f"writing to the stream failed: {e!r}"
                return

    async def close(self) -> None:
        self.reader.cancel()
        self.writer.cancel()
        await self.channel.close()


class AttentionLinks:
    def __init__(self, table: Callable[[], Awaitable[dict[str, str]]], auth: DispatchAuth | None = None,
                 refresh_s: float = 1.0, wait_s: float = 30.0):
        """table: the router's attention replicas, {replica id: channel address}."""
        self._table_source, self.auth = table, auth or DispatchAuth()
        self.refresh_s, self.wait_s = refresh_s, wait_s
        self._credentials = self.auth.channel_credentials()
        self._metadata = self.auth.metadata()
        self._table: dict[str, str] = {}
        self._links: dict[str, _Link] = {}
        self._avoid: dict[str, float] = {}  # address -> until when (draining, broken)
        self._refresher: asyncio.Task | None = None
        self.resumed = 0  # requests continued on another replica (glm_ray_requests_resumed_total)

    # -- the table ------------------------------------------------------------------------------

    async def _refresh(self) -> None:
        try:
            self._table = dict(await self._table_source())
        except Exception as e:  # noqa: BLE001 - keep the last table; the router may be restarting
            log.warning("reading the attention replicas from the router failed: %r", e)
        for address in [a for a in self._links if a not in self._table.values()]:
            link = self._links.pop(address)
            if not link.queues:  # a replica that left: close once its requests are done
                await link.close()
            else:
                self._links[address] = link

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_s)
            await self._refresh()

    def _ensure_refresher(self) -> None:
        if self._refresher is None or self._refresher.done():
            self._refresher = asyncio.ensure_future(self._refresh_forever())

    async def _pick(self, tried: set[str]) -> _Link:
        self._ensure_refresher()
        deadline = time.monotonic() + self.wait_s
        while True:
            now = time.monotonic()
            candidates = [a for a in self._table.values() if a not in tried and self._avoid.get(a, 0) <= now]
            if not candidates:
                candidates = [a for a in self._table.values() if a not in tried]
            if candidates:
                address = min(candidates, key=lambda a: len(self._links[a].queues) if a in self._links else 0)
                link = self._links.get(address)
                if link is None or link.broken is not None:
                    link = self._links[address] = _Link(address, self.auth.open_channel(
                        address, self._credentials), self._metadata)
                return link
            if now >= deadline:
                raise AttentionUnavailable(f"no attention replica took the request within {self.wait_s:.0f} s"
                                           + (f" (tried {', '.join(sorted(tried))})" if tried else
                                              " (none registered with the router)"))
            await asyncio.sleep(min(0.1, self.refresh_s))
            await self._refresh()

    # -- requests -------------------------------------------------------------------------------

    async def generate(self, request: dict) -> AsyncIterator[dict]:
        """Stream the request's delta dicts (piled-up ones merged into one)."""
        request_id = request["request_id"]
        tried: set[str] = set()
        last_error = ""
        delivered: list[int] = []  # output token ids passed on to the caller, for a resume
        sent_chars = 0  # ...and the characters of text they made
        for _attempt in range(MAX_ATTEMPTS):
            try:
                link = await self._pick(tried)
            except AttentionUnavailable as e:
                raise AttentionUnavailable(f"{e}; last error: {last_error}" if last_error else str(e)) from None
            tried.add(link.address)
            queue: asyncio.Queue = asyncio.Queue()
            link.queues[request_id] = queue
            finished = produced = False
            try:
                try:
                    link.send(wire.submit(request))
                except ConnectionError as e:
                    finished = True  # never reached the replica
                    self._avoid[link.address] = time.monotonic() + 5.0
                    log.warning("attention replica %s: its channel is down (%s); trying another", link.address, e)
                    continue
                pending = None  # an item read ahead while merging deltas
                while True:
                    kind, item = pending or await queue.get()
                    pending = None
                    if kind == "delta":
                        while not item["finish_reason"] and not queue.empty():  # the reader fell behind
                            pending = queue.get_nowait()
                            if pending[0] != "delta":
                                break
                            item, pending = merge_delta_dicts(item, pending[1]), None
                        produced = True
                        finished = item["finish_reason"] is not None
                        delivered += item["token_ids"]
                        sent_chars += len(item["text"])
                        yield item
                        if finished:
                            return
                        continue
                    if kind == "error":
                        finished = True  # the replica is done with it
                        if item["code"] == wire.BAD_REQUEST:
                            raise ValueError(item["message"])
                        if item["retry"] and not produced:
                            self._avoid[link.address] = time.monotonic() + self.refresh_s * 3
                            break  # to another replica
                        if item.get("resumable") and delivered:  # the replica gave up on it mid-way
                            last_error = item["message"]
                            request = self._resumed(request, delivered, sent_chars, link.address, item["message"])
                            break
                        raise AttentionUnavailable(f"attention replica {link.address}: {item['message']}; retry "
                                                   "the request")
                    # lost: the stream broke
                    finished = True
                    last_error = item
                    if "UNAUTHENTICATED" in item:
                        raise AttentionUnavailable(f"attention replica {link.address} refused this ingress: {item}. "
                                                   "The cluster secrets differ: deploy every replica with the same "
                                                   "cluster_secret")
                    self._avoid[link.address] = time.monotonic() + 5.0
                    if delivered:  # go on elsewhere from the last token passed on
                        request = self._resumed(request, delivered, sent_chars, link.address, item)
                    break  # nothing produced: send it elsewhere as it is
            finally:
                link.queues.pop(request_id, None)
                if not finished and link.broken is None:  # the client went away: free the replica's work
                    link.send(wire.abort(request_id))
        raise AttentionUnavailable(f"no attention replica could take the request (tried {', '.join(sorted(tried))})")

    def _resumed(self, request: dict, delivered: list[int], sent_chars: int, address: str, why: str) -> dict:
        """The request to send elsewhere, to continue after the `delivered` tokens."""
        self.resumed += 1
        log.warning("attention replica %s lost request %s after %d tokens (%s): resuming it on another replica",
                    address, request["request_id"], len(delivered), why)
        return {**request, "resume": {"token_ids": list(delivered), "num_sent_chars": sent_chars}}

    async def close(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
        for link in self._links.values():
            await link.close()
        self._links.clear()
