"""One expert-group replica's gRPC `ExpertService` (protos/glm_ray/v1/experts.proto).

Forward and ForwardStream take and return raw message bytes; parsing, the grouped SwiGLU and
encoding the reply run in one piece. A ForwardStream message, the hot path (one a MoE layer), is
computed on the grpc.aio loop thread as it arrives: no hop to a worker thread and back, which in the
running app took each layer's round trip two thread wake-ups on busy cores (BENCHMARKS.md). Ping and
Info wait for it, so a server should have the loop to itself. A unary Forward (tools, one-off calls)
runs on a worker thread and leaves the loop free meanwhile. Bad requests are INVALID_ARGUMENT with a
message naming the field. A server may hold several placement versions (during a rebalance: the
one in force and the next, `add_version`, until every attention replica moved, `retire`); a
request names the version it was split by, and one the server does not hold is
FAILED_PRECONDITION: a unary Forward fails with that status, a ForwardStream message gets a reply
carrying it (`error_code`, `error`) and the stream goes on.
With a DispatchAuth (experts/auth.py), every call must carry the cluster secret (else UNAUTHENTICATED,
before any handler runs) and, with TLS configured, the port speaks TLS only.
Legend: T_g tokens sent to this group, K top-k, H hidden, E_g experts held.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import torch
from google.protobuf.message import DecodeError

from glm_ray.experts.auth import DispatchAuth
from glm_ray.experts.load import LoadMeter
from glm_ray.experts.compute import ExpertCompute, select_compute
from glm_ray.experts.local import ExpertWeights
from glm_ray.experts.staging import HostStaging
from glm_ray.experts.wire import GRPC_OPTIONS, dtype_name, tensor_from_proto, tensor_to_proto
from glm_ray.v1 import experts_pb2 as pb

SERVICE = pb.DESCRIPTOR.services_by_name["ExpertService"].full_name  # "glm_ray.v1.ExpertService"
FORWARD_METHOD = f"/{SERVICE}/Forward"
FORWARD_STREAM_METHOD = f"/{SERVICE}/ForwardStream"
_ID_DTYPES = (torch.int16, torch.int32, torch.int64)


class BadRequest(ValueError):
    """The request cannot be served as sent (-> INVALID_ARGUMENT)."""


class StalePlacement(ValueError):
    """The caller's placement table differs from the one this server was loaded for (-> FAILED_PRECONDITION)."""


class ExpertServer:
    """Serves `layers` (MoE layer -> this group's ExpertWeights, the same experts in every layer) as
    placement version `placement_version`;
    `auth`: the cluster secret calls must carry and TLS for the port (None: neither);
    `load_window_s`: the look-back window of `load` (busy fraction, tokens per second);
    `num_threads`: torch's threads on the threads that compute (None: leave torch's setting);
    `compute`: the expert backend (experts/compute.py; default `auto` for the weights' device).
    Requests arrive as host bytes; on a GPU they go up and the reply down through reused pinned
    buffers (experts/staging.py)."""

    def __init__(self, layers: dict[int, ExpertWeights], group: int, *, placement_version: int = 0,
                 auth: DispatchAuth | None = None, load_window_s: float = 10.0, num_threads: int | None = None,
                 compute: ExpertCompute | None = None):
        self.group = group
        first = _check_layers(layers, group)
        self.device = first.w13.device
        self.compute = compute or select_compute("auto", self.device)
        self.staging = HostStaging(self.device)
        self.versions: dict[int, dict[int, ExpertWeights]] = {placement_version: layers}  # replaced, never mutated
        self._rebalanced = False  # once a version was added, a request's 0 means version 0, never "unchecked"
        self.dtype = first.compute_dtype  # of the hidden states it takes (the weights may be held narrower)
        self.hidden_size = first.w13.shape[2]
        self.auth = auth or DispatchAuth()
        self._credentials = self.auth.server_credentials()  # reads the TLS files now: a bad path fails here
        self.load = LoadMeter(load_window_s)  # every computed request: its seconds and tokens
        self.in_flight = 0  # Forward calls being served now
        self.num_calls = 0  # Forward calls finished, ok or not
        # torch's threads are set on the threads that compute (the loop's, in start(), and this one):
        # see engine/async_engine.py for why the thread that loaded the weights should run one
        self.num_threads = num_threads
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"expert-group-{group}",
                                            initializer=_set_torch_threads, initargs=(num_threads,))
        self._server: grpc.aio.Server | None = None
        self.address: str | None = None  # "host:port" once started

    @property
    def placement_version(self) -> int:
        """The newest version held."""
        return max(self.versions)

    @property
    def layers(self) -> dict[int, ExpertWeights]:
        return self.versions[self.placement_version]

    @property
    def expert_ids(self) -> list[int]:
        return list(next(iter(self.layers.values())).expert_ids)

    def numel(self) -> int:
        """Parameters held, every version counted (a copy shared by two versions once)."""
        seen, total = set(), 0
        for layers in self.versions.values():
            for w in layers.values():
                for t in (w.w13, w.w2):
                    if t.data_ptr() not in seen:
                        seen.add(t.data_ptr())
                        total += t.numel()
        return total

    def add_version(self, version: int, layers: dict[int, ExpertWeights]) -> None:
        """Serve `layers` for requests split by placement `version` too (the versions held so far stay)."""
        first = _check_layers(layers, self.group)
        if (first.compute_dtype, first.w13.shape[2]) != (self.dtype, self.hidden_size) or set(layers) != set(self.layers):
            raise ValueError(f"expert group {self.group}: version {version} holds layers {sorted(layers)} "
                             f"{first.compute_dtype} hidden {first.w13.shape[2]}, the server {sorted(self.layers)} "
                             f"{self.dtype} hidden {self.hidden_size}")
        self.versions = {**self.versions, version: layers}
        self._rebalanced = True

    def retire(self, keep: set[int]) -> list[int]:
        """Drop every version not in `keep` (unless that would leave none: then the newest stays);
        returns the versions dropped."""
        kept = {v: w for v, w in self.versions.items() if v in keep}
        if not kept:
            kept = {self.placement_version: self.layers}
        dropped = [v for v in self.versions if v not in kept]
        if dropped:
            self.versions = kept
        return dropped

    # -- the computation, callable without gRPC ------------------------------------------------

    def forward_bytes(self, request: bytes) -> bytes:
        """A serialized ForwardRequest -> a serialized ForwardReply; BadRequest/StalePlacement if unservable."""
        start = time.perf_counter()
        try:
            req = pb.ForwardRequest.FromString(request)
        except DecodeError as e:
            raise BadRequest(f"expert group {self.group}: request is not a ForwardRequest ({e})") from None
        versions = self.versions
        layers = versions.get(req.placement_version)
        if layers is None and req.placement_version == 0 and not self._rebalanced:
            layers = next(iter(versions.values()))  # unchecked
        if layers is None:
            held = ", ".join(map(str, sorted(versions)))
            raise StalePlacement(f"expert group {self.group} serves placement version {held}, the request was "
                                 f"split with version {req.placement_version}; refresh the placement")
        hidden_states, local_ids, topk_weights = self._check(req, layers)
        held = layers[req.layer]
        up = self.staging.to_device
        partial = self.compute(up("hidden_states", hidden_states), up("local_ids", local_ids, torch.long),
                               up("topk_weights", topk_weights), held)  # [T_g, H] fp32
        reply = pb.ForwardReply(request_id=req.request_id)
        tensor_to_proto(self.staging.to_host("partial", partial), reply.partial)
        reply.compute_s = time.perf_counter() - start
        self.load.record(reply.compute_s, hidden_states.shape[0])
        return reply.SerializeToString()

    def _check(self, req: pb.ForwardRequest, layers: dict[int, ExpertWeights]
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        where = f"expert group {self.group}, layer {req.layer}"
        if req.layer not in layers:
            raise BadRequest(f"{where}: layer {req.layer} is not served here (MoE layers held: {sorted(layers)})")
        try:
            hidden_states = tensor_from_proto(req.hidden_states, what=f"{where}: hidden_states")
            local_ids = tensor_from_proto(req.local_ids, what=f"{where}: local_ids")
            topk_weights = tensor_from_proto(req.topk_weights, what=f"{where}: topk_weights")
        except ValueError as e:
            raise BadRequest(str(e)) from None
        if hidden_states.dim() != 2 or hidden_states.shape[1] != self.hidden_size:
            raise BadRequest(f"{where}: hidden_states has shape {list(hidden_states.shape)}, "
                             f"expected [T, {self.hidden_size}]")
        if hidden_states.dtype != self.dtype:
            raise BadRequest(f"{where}: hidden_states is {dtype_name(hidden_states.dtype)}, the experts here are "
                             f"{dtype_name(self.dtype)}; load attention and experts in one dtype")
        t = hidden_states.shape[0]
        if local_ids.dim() != 2 or local_ids.shape[0] != t or local_ids.dtype not in _ID_DTYPES:
            raise BadRequest(f"{where}: local_ids is {dtype_name(local_ids.dtype)} {list(local_ids.shape)}, "
                             f"expected int16/int32 [{t}, K]")
        if topk_weights.shape != local_ids.shape or topk_weights.dtype != torch.float32:
            raise BadRequest(f"{where}: topk_weights is {dtype_name(topk_weights.dtype)} "
                             f"{list(topk_weights.shape)}, expected float32 {list(local_ids.shape)}")
        held = len(layers[req.layer].expert_ids)
        if local_ids.numel() and not (-1 <= int(local_ids.min()) and int(local_ids.max()) < held):
            raise BadRequest(f"{where}: local_ids range {int(local_ids.min())}..{int(local_ids.max())}, "
                             f"expected -1..{held - 1} ({held} experts held)")
        return hidden_states, local_ids, topk_weights

    # -- gRPC ----------------------------------------------------------------------------------

    async def _serve_one(self, request: bytes, on_loop: bool = False) -> tuple[bytes | None, grpc.StatusCode, str]:
        """(reply bytes, OK, "") or (None, status, message); computed on this loop's thread if
        `on_loop`, else on the worker thread."""
        self.in_flight += 1
        try:
            if on_loop:
                reply = self.forward_bytes(request)
            else:
                reply = await asyncio.get_running_loop().run_in_executor(self._executor, self.forward_bytes, request)
        except BadRequest as e:
            return None, grpc.StatusCode.INVALID_ARGUMENT, str(e)
        except StalePlacement as e:
            return None, grpc.StatusCode.FAILED_PRECONDITION, str(e)
        except Exception as e:  # noqa: BLE001 - reported to the caller, who retries elsewhere
            return None, grpc.StatusCode.INTERNAL, f"expert group {self.group}: {type(e).__name__}: {e}"
        finally:
            self.in_flight -= 1
            self.num_calls += 1
        return reply, grpc.StatusCode.OK, ""

    async def _forward(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        reply, status, message = await self._serve_one(request)
        if reply is None:
            await context.abort(status, message)
        return reply

    async def _forward_stream(self, requests, context: grpc.aio.ServicerContext):
        """One reply per request, in order (the caller matches them by position), each computed
        here on the loop as it arrives."""
        async for request in requests:
            reply, status, message = await self._serve_one(request, on_loop=True)
            yield reply if reply is not None else pb.ForwardReply(error_code=status.value[0],
                                                                  error=message).SerializeToString()

    async def _info(self, request: pb.InfoRequest, context) -> pb.InfoReply:
        return pb.InfoReply(group=self.group, expert_ids=self.expert_ids, layers=sorted(self.layers),
                            num_parameters=self.numel(), dtype=dtype_name(self.dtype),
                            hidden_size=self.hidden_size, placement_version=self.placement_version)

    async def _ping(self, request: pb.PingRequest, context) -> pb.PingReply:
        return pb.PingReply(in_flight=self.in_flight, num_calls=self.num_calls)

    def _handlers(self) -> dict[str, grpc.RpcMethodHandler]:
        def typed(fn, req, rep):
            return grpc.unary_unary_rpc_method_handler(fn, request_deserializer=req.FromString,
                                                       response_serializer=rep.SerializeToString)
        return {
            # bytes in, bytes out: (de)serialisation goes with the computation (forward_bytes)
            "Forward": grpc.unary_unary_rpc_method_handler(self._forward),
            "ForwardStream": grpc.stream_stream_rpc_method_handler(self._forward_stream),
            "Info": typed(self._info, pb.InfoRequest, pb.InfoReply),
            "Ping": typed(self._ping, pb.PingRequest, pb.PingReply),
        }

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Serve on the running event loop; returns the bound "host:port"."""
        if self._server is not None:
            raise RuntimeError(f"expert group {self.group}: server already started")
        _set_torch_threads(self.num_threads)
        # so_reuseport off: a port already taken must fail here, not silently share traffic
        server = grpc.aio.server(options=[*GRPC_OPTIONS, ("grpc.so_reuseport", 0)],
                                 interceptors=self.auth.server_interceptors() or None)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, self._handlers()),))
        if self._credentials is None:
            bound = server.add_insecure_port(f"{host}:{port}")
        else:
            bound = server.add_secure_port(f"{host}:{port}", self._credentials)
        if bound == 0:
            raise OSError(f"expert group {self.group}: cannot bind {host}:{port}")
        await server.start()
        self._server = server
        self.address = f"{host}:{bound}"
        return self.address

    async def stop(self, grace: float | None = 1.0) -> None:
        """Finish the requests being computed for up to `grace` seconds (None: cancel them now),
        then close. Open ForwardStreams, idle between requests, are cut then: their callers send
        what follows to another replica."""
        if self._server is not None:
            deadline = time.monotonic() + (grace or 0.0)
            while self.in_flight and time.monotonic() < deadline:
                await asyncio.sleep(0.005)
            await self._server.stop(None)
            self._server = None
        self._executor.shutdown(wait=False, cancel_futures=True)


def _check_layers(layers: dict[int, ExpertWeights], group: int) -> ExpertWeights:
    """The first layer's weights, once every layer holds the same experts in the same dtype and shape."""
    if not layers:
        raise ValueError(f"expert group {group}: no layers to serve")
    first = next(iter(layers.values()))
    for layer, w in layers.items():
        if (w.expert_ids != first.expert_ids or w.w13.dtype != first.w13.dtype or w.w13.shape != first.w13.shape
                or w.compute_dtype != first.compute_dtype):
            raise ValueError(f"expert group {group}: layer {layer} holds experts {w.expert_ids} "
                             f"{w.w13.dtype} {list(w.w13.shape)} computed in {w.compute_dtype}, layer "
                             f"{next(iter(layers))} holds {first.expert_ids} {first.w13.dtype} "
                             f"{list(first.w13.shape)} computed in {first.compute_dtype}; all must match")
    return first


def _set_torch_threads(num_threads: int | None) -> None:
    if num_threads is not None:
        torch.set_num_threads(num_threads)
