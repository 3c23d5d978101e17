"""Routed experts over gRPC: one ForwardRequest per destination group per MoE layer (design.md, "The hot path").

`submit` splits the (token, expert) pairs by group on the caller's thread, sends every group its
tokens concurrently from a dedicated event-loop thread, each on the long-lived stream to the
replica chosen (experts/stream.py), and `result()` scatter-adds the groups' fp32 partial sums and
casts once. A failed call moves to another replica of the group; with none
left the caller's registry is asked to refresh and we wait a bounded time, then raise
ExpertUnavailableError. A replica refusing our cluster secret (UNAUTHENTICATED) is a
configuration error, not a replica failure: ExpertCallError at once. TLS that does not verify
looks like an unreachable replica (UNAVAILABLE), so it ends in ExpertUnavailableError, the
handshake error in its message. Legend: T tokens, K top-k, H hidden, T_g tokens sent to group g.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import defaultdict
from concurrent.futures import Future
from dataclasses import dataclass, field, fields
from typing import Protocol

import grpc
import numpy as np
import torch

from glm_ray.experts.auth import DispatchAuth
from glm_ray.experts.backend import ExpertBackend
from glm_ray.experts.policy import LeastOutstanding, ReplicaPolicy
from glm_ray.experts.stream import CallFailed, ReplicaStream
from glm_ray.experts.staging import HostStaging
from glm_ray.experts.wire import GRPC_OPTIONS, MAX_MESSAGE_BYTES, array_to_proto, dtype_name, tensor_from_proto
from glm_ray.router.placement import Placement, Spreader
from glm_ray.v1 import experts_pb2 as pb

log = logging.getLogger(__name__)
REFRESH_INTERVAL_S = 0.2
FORGET_INTERVAL_S = 5.0  # how often channels to replicas that left the table are closed

# A replica's failure, not the request's: the same bytes may succeed on another replica.
RETRY_CODES = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED,
               grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.ABORTED}


class ExpertUnavailableError(RuntimeError):
    """No replica of an expert group answered within the bounded wait. Retryable: re-run the step
    once the group has replicas again."""

    retryable = True

    def __init__(self, group: int, layer: int, waited_s: float, last_error: str):
        super().__init__(f"expert group {group} (MoE layer {layer}): no replica answered; waited {waited_s:.1f} s "
                         f"for one to appear. Check that the group's replicas are running and registered. "
                         f"Last error: {last_error}")
        self.group, self.layer = group, layer


class ExpertCallError(RuntimeError):
    """A replica rejected the request itself (bad shape, stale placement) or this caller (another
    cluster secret): not retried."""

    retryable = False


class ReplicaSource(Protocol):
    def snapshot(self) -> dict[int, list[str]]:
        """Current replica addresses per group; called on every call, so keep it a cached lookup."""

    def refresh(self) -> None:
        """Optional: re-read the registry now (called off the event loop, after failures)."""


class StaticReplicas:
    """A fixed address book; `set` replaces one group's addresses (tests, single-process use)."""

    def __init__(self, replicas: dict[int, list[str]]):
        self.replicas = {g: list(a) for g, a in replicas.items()}

    def snapshot(self) -> dict[int, list[str]]:
        return self.replicas

    def set(self, group: int, addresses: list[str]) -> None:
        self.replicas = {**self.replicas, group: list(addresses)}

    def refresh(self) -> None:
        pass


@dataclass
class TransportStats:
    """Counters since the last `take()`; the bench reads them per step."""

    calls: int = 0  # RPCs issued, retries included
    retries: int = 0  # RPCs re-sent to another replica after a failure
    bytes_sent: int = 0
    bytes_received: int = 0
    serialize_s: float = 0.0  # caller thread: split + encode requests, decode + scatter-add replies
    wait_s: float = 0.0  # caller thread blocked in result() for replies
    rpc_s: float = 0.0  # summed round trips of the RPCs
    server_compute_s: float = 0.0  # summed server-reported compute time
    slowest_group_s: float = 0.0  # per call, the longest server-reported compute time among its groups, summed
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **deltas) -> None:
        with self._lock:
            for name, value in deltas.items():
                setattr(self, name, getattr(self, name) + value)

    def take(self) -> dict[str, float]:
        """The counters as a dict, reset to zero."""
        with self._lock:
            out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "_lock"}
            for f in fields(self):
                if f.name != "_lock":
                    setattr(self, f.name, f.default)
        return out


class EventLoopThread:
    """An asyncio loop running forever in a daemon thread; grpc.aio objects live on it."""

    def __init__(self, name: str = "glm-ray-grpc"):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def submit(self, coro) -> Future:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro, timeout: float | None = None):
        return self.submit(coro).result(timeout)

    def stop(self) -> None:
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join()
        self.loop.close()


class _Table:
    """A placement with what splitting a batch by it needs."""

    def __init__(self, placement: Placement):
        self.placement = placement
        self.spread = Spreader(placement)
        max_slots = max(len(g) for g in placement.groups)
        # "int16" | "int32", as the wire names them
        self.id_dtype = np.dtype(np.int16 if max_slots <= np.iinfo(np.int16).max else np.int32)


class PendingRemote:
    def __init__(self, owner: RemoteExperts, future: Future, rows: list[np.ndarray | None], like: torch.Tensor,
                 request_id: int):
        """rows: per group, the token rows it was sent (None: all of them)."""
        self._owner, self._future, self._rows, self._like = owner, future, rows, like
        self._request_id = request_id
        self._value: torch.Tensor | None = None

    def result(self) -> torch.Tensor:
        if self._value is not None:
            return self._value
        stats = self._owner.stats
        t0 = time.perf_counter()
        replies: list[pb.ForwardReply] = self._future.result()
        t1 = time.perf_counter()
        # numpy, not torch: these few small adds run on this thread alone, instead of waking torch's
        # OpenMP workers (asleep through the wait) on cores the expert groups may still hold
        staging = self._owner.staging
        if staging.active:  # a GPU replica: sum into a reused pinned buffer, then one queued copy up
            staged, ring_index = staging.reserve("partial", tuple(self._like.shape), torch.float32)
            out = staged.numpy()
            out.fill(0.0)
        else:
            out = np.zeros(tuple(self._like.shape), dtype=np.float32)  # [T, H]
        received, compute, slowest = 0, 0.0, 0.0
        for rows, reply in zip(self._rows, replies):
            if reply.request_id != self._request_id:
                raise ExpertCallError(f"expert reply for request {reply.request_id}, expected {self._request_id}")
            partial = tensor_from_proto(reply.partial, what="ForwardReply.partial")  # [T_g, H] fp32
            n = out.shape[0] if rows is None else len(rows)
            if partial.dtype != torch.float32 or partial.shape != (n, out.shape[1]):
                raise ExpertCallError(f"expert reply is {partial.dtype} {list(partial.shape)}, "
                                      f"expected float32 [{n}, {out.shape[1]}]")
            if rows is None:  # the group got every token
                out += partial.numpy()
            else:  # rows are distinct: gather, add, put back
                out[rows] += partial.numpy()
            received += reply.ByteSize()
            compute += reply.compute_s
            slowest = max(slowest, reply.compute_s)
        if staging.active:
            self._value = staging.upload("partial", ring_index, staged, self._like.dtype)
        else:
            self._value = torch.from_numpy(out).to(dtype=self._like.dtype)
        stats.add(wait_s=t1 - t0, serialize_s=time.perf_counter() - t1, bytes_received=received,
                  server_compute_s=compute, slowest_group_s=slowest)
        return self._value


class RemoteExperts(ExpertBackend):
    """ExpertBackend over gRPC to expert-group replicas.

    placement: expert -> (group, slot); replicas: addresses per group (`snapshot()`, optional
    `refresh()`); policy: replica choice within a group; call_timeout_s: per RPC;
    unavailable_wait_s: how long to wait for a group with no live replica before
    ExpertUnavailableError; suspect_s: how long a replica that failed is avoided;
    loop: run on this EventLoopThread instead of owning one; auth: the cluster secret every call
    carries and TLS for the channels (None: neither); device: where the caller's tensors live (a GPU
    stages them through reused pinned host buffers; the wire is the same either way).
    """

    def __init__(self, placement: Placement, replicas: ReplicaSource, *, policy: ReplicaPolicy | None = None,
                 call_timeout_s: float = 60.0, unavailable_wait_s: float = 10.0, suspect_s: float = 5.0,
                 poll_s: float = 0.05, loop: EventLoopThread | None = None, auth: DispatchAuth | None = None,
                 device: torch.device | str = "cpu"):
        self.replicas = replicas
        self.staging = HostStaging(device)
        self.policy = policy or LeastOutstanding()
        self.call_timeout_s, self.unavailable_wait_s = call_timeout_s, unavailable_wait_s
        self.suspect_s, self.poll_s = suspect_s, poll_s
        self.stats = TransportStats()
        self._auth = auth or DispatchAuth()
        self._metadata = self._auth.metadata()
        self._credentials = self._auth.channel_credentials()  # reads the CA file now: a bad path fails here
        self._owns_loop = loop is None
        self._loop = loop or EventLoopThread("glm-ray-remote-experts")
        self._table = _Table(placement)
        self._next_table: _Table | None = None  # a newer placement, taken at the next step's start
        self._group_pairs: dict[tuple[int, int], np.ndarray] = {}  # (version, layer) -> pairs sent per group
        self._pairs_lock = threading.Lock()
        self._request_ids = itertools.count(1)
        self._closed = False
        # loop-thread state only
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._streams: dict[str, ReplicaStream] = {}
        self._outstanding: dict[str, int] = defaultdict(int)
        self._suspect_until: dict[str, float] = {}
        self._refreshing: asyncio.Future | None = None
        self._last_refresh = float("-inf")
        self._last_forget = time.monotonic()

    @property
    def placement(self) -> Placement:
        return self._table.placement

    def set_placement(self, placement: Placement, *, now: bool = False) -> None:
        """Use `placement` from the next step on (`begin_step`), or at once with `now`: a step's MoE
        layers all go by one table. Expert replicas must hold its version already (the router
        publishes a version only then)."""
        if placement.num_experts != self._table.placement.num_experts:
            raise ValueError(f"placement version {placement.version} covers {placement.num_experts} experts, "
                             f"the current one {self._table.placement.num_experts}")
        if now:
            self._table, self._next_table = _Table(placement), None
        else:
            self._next_table = _Table(placement)

    def begin_step(self) -> None:
        if self._next_table is not None:
            self._table, self._next_table = self._next_table, None

    def take_group_pairs(self) -> dict[int, dict[int, list[int]]]:
        """{placement version: {layer: (token, expert) pairs sent to each group}} since the last call."""
        with self._pairs_lock:
            pairs, self._group_pairs = self._group_pairs, {}
        out: dict[int, dict[int, list[int]]] = {}
        for (version, layer), per_group in pairs.items():
            out.setdefault(version, {})[layer] = per_group.tolist()
        return out

    def forward(self, layer, hidden_states, topk_ids, topk_weights):
        return self.submit(layer, hidden_states, topk_ids, topk_weights).result()

    def submit(self, layer, hidden_states, topk_ids, topk_weights) -> PendingRemote:
        t0 = time.perf_counter()
        # numpy, not torch, for the split: a decode step is dozens of tiny ops, each ~5x cheaper there
        # from a GPU, through reused pinned buffers (staging.py); on CPU these are the tensors themselves
        x = self.staging.to_host("hidden_states", hidden_states.detach())  # [T, H]
        x_np = (x.view(torch.int16) if x.dtype == torch.bfloat16 else x).numpy()
        x_dtype = dtype_name(x.dtype)
        ids = self.staging.to_host("topk_ids", topk_ids).numpy()  # [T, K]
        weights = self.staging.to_host("topk_weights", topk_weights.float()).numpy()  # [T, K]
        table = self._table  # one table for the whole call
        version = table.placement.version
        group, slot = table.spread(ids)  # [T, K] each pair's group and slot there
        counts = np.bincount(group.reshape(-1), minlength=table.placement.num_groups)
        with self._pairs_lock:
            acc = self._group_pairs.get((version, layer))
            self._group_pairs[(version, layer)] = counts if acc is None else acc + counts
        request_id = next(self._request_ids)
        rows, payloads = [], []
        for g in np.unique(group).tolist():  # groups no token chose get no call
            mine = group == g  # [T, K]
            g_rows = np.flatnonzero(mine.any(axis=1))  # [T_g]
            every = len(g_rows) == len(ids)  # common in decode: then no row gathers at all
            sel = slice(None) if every else g_rows  # a slice selects by view, an index array copies
            req = pb.ForwardRequest(layer=layer, request_id=request_id, placement_version=version)
            array_to_proto(x_np[sel], x_dtype, req.hidden_states)
            local_ids = np.where(mine[sel], slot[sel], -1).astype(table.id_dtype)
            array_to_proto(local_ids, table.id_dtype.name, req.local_ids)
            array_to_proto(weights[sel], "float32", req.topk_weights)
            payload = req.SerializeToString()
            largest = max(len(payload), len(g_rows) * x.shape[1] * 4)  # the reply is [T_g, H] fp32
            if largest > MAX_MESSAGE_BYTES:
                raise ValueError(f"MoE layer {layer}: {len(g_rows)} tokens for expert group {g} make a "
                                 f"{largest / 2**20:.0f} MiB message, over the {MAX_MESSAGE_BYTES >> 20} MiB gRPC "
                                 "limit; run prefill in smaller chunks")
            rows.append(None if every else g_rows)
            payloads.append((g, payload))
        future = self._loop.submit(self._dispatch(layer, payloads))
        self.stats.add(serialize_s=time.perf_counter() - t0, bytes_sent=sum(len(p) for _, p in payloads))
        return PendingRemote(self, future, rows, hidden_states, request_id)

    def close(self) -> None:
        """Close every channel and, if owned, the event-loop thread."""
        if self._closed:
            return
        self._closed = True

        async def _close():
            for stream in self._streams.values():
                stream.close()
            self._streams.clear()
            for channel in self._channels.values():
                await channel.close()
            self._channels.clear()
        self._loop.run(_close(), timeout=10)
        if self._owns_loop:
            self._loop.stop()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- on the event-loop thread --------------------------------------------------------------

    async def _dispatch(self, layer: int, payloads: list[tuple[int, bytes]]) -> list[pb.ForwardReply]:
        return list(await asyncio.gather(*(self._call_group(g, layer, p) for g, p in payloads)))

    async def _call_group(self, group: int, layer: int, payload: bytes) -> pb.ForwardReply:
        tried: set[str] = set()
        deadline: float | None = None  # set once no replica is left to try
        last_error = "no replica registered for this group"
        while True:
            address = self._pick(group, tried)
            if address is None:
                now = time.monotonic()
                deadline = deadline if deadline is not None else now + self.unavailable_wait_s
                if now >= deadline:
                    raise ExpertUnavailableError(group, layer, self.unavailable_wait_s, last_error)
                self._refresh_soon()
                await asyncio.sleep(min(self.poll_s, deadline - now))
                continue
            if tried:
                self.stats.add(retries=1)
            tried.add(address)
            try:
                return await self._call(address, payload)
            except CallFailed as e:
                if e.code == grpc.StatusCode.UNAUTHENTICATED:
                    raise ExpertCallError(
                        f"expert group {group} replica {address} refused MoE layer {layer}: UNAUTHENTICATED: "
                        f"{e.details}. The cluster secrets differ: deploy the attention and expert-group "
                        "replicas with the same cluster_secret") from None
                if e.code not in RETRY_CODES:
                    raise ExpertCallError(f"expert group {group} replica {address} rejected MoE layer {layer}: "
                                          f"{e.code.name}: {e.details}") from None
                last_error = f"{address}: {e.code.name}: {e.details}"
                log.warning("expert group %d, layer %d: %s; trying another replica", group, layer, last_error)
                self._suspect_until[address] = time.monotonic() + self.suspect_s
                self._refresh_soon()

    def _pick(self, group: int, tried: set[str]) -> str | None:
        replicas = self.replicas.snapshot().get(group, [])
        now = time.monotonic()
        if now - self._last_forget > FORGET_INTERVAL_S:
            self._last_forget = now
            self._forget_gone()
        suspect = {a for a in replicas if self._suspect_until.get(a, 0.0) > now}
        # suspects are a last resort, not a ban: the failure may have been transient
        return (self.policy.choose(replicas, self._outstanding, tried | suspect)
                or self.policy.choose(replicas, self._outstanding, tried))

    def _forget_gone(self) -> None:
        """Close the stream and channel of every replica that left the table and has no call in
        flight here, and drop what was known of it: under autoscaling, addresses come and go."""
        listed = {a for addresses in self.replicas.snapshot().values() for a in addresses}
        gone = [a for a in set(self._channels) | set(self._suspect_until) | set(self._outstanding)
                if a not in listed and not self._outstanding.get(a)]
        for address in gone:
            stream = self._streams.pop(address, None)
            if stream is not None:
                stream.close()
            channel = self._channels.pop(address, None)
            if channel is not None:
                asyncio.ensure_future(channel.close())
            self._suspect_until.pop(address, None)
            self._outstanding.pop(address, None)

    async def _call(self, address: str, payload: bytes) -> pb.ForwardReply:
        stream = self._streams.get(address)
        if stream is None or stream.failure is not None:
            if address not in self._channels:
                self._channels[address] = self._auth.open_channel(address, self._credentials, GRPC_OPTIONS)
            # requests go as bytes, encoded on the caller's thread
            stream = self._streams[address] = ReplicaStream(self._channels[address], self._metadata)
        self._outstanding[address] += 1
        start = time.perf_counter()
        try:
            return await stream.forward(payload, self.call_timeout_s)
        finally:
            self._outstanding[address] -= 1
            self.stats.add(calls=1, rpc_s=time.perf_counter() - start)

    def _refresh_soon(self) -> None:
        """Ask the replica source to re-read its registry, in a thread, one at a time, at most every 0.2 s."""
        refresh = getattr(self.replicas, "refresh", None)
        now = time.monotonic()
        busy = self._refreshing is not None and not self._refreshing.done()
        if refresh is None or busy or now - self._last_refresh < REFRESH_INTERVAL_S:
            return
        self._last_refresh = now
        self._refreshing = asyncio.ensure_future(asyncio.to_thread(refresh))
        self._refreshing.add_done_callback(
            lambda f: f.cancelled() or f.exception() is None or log.warning("replica refresh failed: %r", f.exception()))
