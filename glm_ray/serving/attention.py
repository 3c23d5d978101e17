"""`AttentionReplica`: the engine (embeddings, attention, dense layers, gates, shared experts, LM
head, KV cache, scheduler) with routed experts reached over gRPC. Loads no routed-expert tensor.
"""

from __future__ import annotations

import logging
import os
import statistics
import threading
import time
import uuid

import ray

import torch
from ray import serve

from glm_ray.engine.async_engine import AsyncLLMEngine
from glm_ray.engine.config import EngineOptions
from glm_ray.engine.sampling_params import SamplingParams
from glm_ray.experts.auth import DispatchAuth
from glm_ray.experts.backend import ExpertBackend
from glm_ray.experts.policy import PowerOfTwoChoices
from glm_ray.config import load_model_config
from glm_ray.device import ray_gpus_assigned, resolve_device
from glm_ray.experts.compute import select_compute
from glm_ray.experts.local import LocalExperts
from glm_ray.experts.remote import EventLoopThread, RemoteExperts
from glm_ray.model.loader import load_weights
from glm_ray.router.placement import Placement
from glm_ray.serving.attention_channel import AttentionChannelServer
from glm_ray.serving.autoscaling import KV_USAGE, SEQUENCES
from glm_ray.router.registry import Snapshot
from glm_ray.serving.protocol import delta_to_dict

log = logging.getLogger("glm_ray.attention")


class RoutingCounter(ExpertBackend):
    """Counts tokens per expert per layer on their way to another backend; the counts go to the
    router's routing statistics (imbalance, /v1/experts)."""

    def __init__(self, inner: ExpertBackend, num_experts: int):
        self.inner, self.num_experts = inner, num_experts
        self._counts: dict[int, torch.Tensor] = {}
        self._lock = threading.Lock()

    def submit(self, layer, hidden_states, topk_ids, topk_weights):
        counts = torch.bincount(topk_ids.reshape(-1), minlength=self.num_experts)
        with self._lock:
            acc = self._counts.get(layer)
            self._counts[layer] = counts if acc is None else acc + counts
        return self.inner.submit(layer, hidden_states, topk_ids, topk_weights)

    def forward(self, layer, hidden_states, topk_ids, topk_weights):
        return self.submit(layer, hidden_states, topk_ids, topk_weights).result()

    def begin_step(self) -> None:
        self.inner.begin_step()

    def take_counts(self) -> dict[int, list[int]]:
        with self._lock:
            counts, self._counts = self._counts, {}
        return {layer: c.tolist() for layer, c in counts.items()}

    def take_report(self) -> tuple[dict, dict]:
        """(tokens per expert, pairs per group by placement version) since the last report."""
        pairs = self.inner.take_group_pairs() if isinstance(self.inner, RemoteExperts) else {}
        return self.take_counts(), pairs


def keep_known(current: Snapshot, new: Snapshot) -> Snapshot:
    """`new`, except that a group it shows without any replica keeps the addresses `current` had:
    a restarted router knows no replica until each re-registers (within a heartbeat), and those
    replicas are most likely alive, so dispatch goes on from the cached table. An address that is
    really gone fails its call and the group waits for a live one, as with an empty list."""
    replicas = {g: (addresses or current.replicas.get(g, [])) for g, addresses in new.replicas.items()}
    return Snapshot(new.version, replicas, new.load)


class RouterSnapshots:
    """The replica table as last read from the router, refreshed by a background thread every
    `refresh_s` and on demand after a failed call. Never on the per-layer path. The same thread
    reports routing counts (`report()`) and this replica's load (`load()`, under `replica_id`)."""

    def __init__(self, router, refresh_s: float, report=None, load=None, replica_id: str = ""):
        self.router, self.refresh_s, self.report = router, refresh_s, report
        self.load, self.replica_id = load, replica_id
        self.on_placement = None  # called with each placement dict the router publishes
        self.placement: dict | None = None
        self.read_once = threading.Event()  # set once a snapshot was read
        self.address: str | None = None  # this replica's channel, advertised with each load report
        self._current = Snapshot(-1, {})
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="router-snapshots", daemon=True)
        self._thread.start()

    def snapshot(self) -> dict[int, list[str]]:
        return self._current.replicas

    @property
    def version(self) -> int:
        return self._current.version

    def refresh(self) -> None:
        self._wake.set()

    def _run(self):
        while not self._stop.is_set():
            try:
                raw = self.router.snapshot.remote().result(timeout_s=5)
                snap = keep_known(self._current, Snapshot.from_dict(raw))
                if snap.version != self._current.version or snap.replicas != self._current.replicas:
                    self._current = snap
                self.placement = raw.get("placement")
                self.read_once.set()
                if self.on_placement is not None and self.placement:
                    self.on_placement(self.placement)
                counts, pairs = self.report() if self.report else ({}, {})
                if counts or pairs:
                    self.router.report_routing.remote(counts, pairs)
                if self.load is not None:
                    self.router.report_attention.remote(self.replica_id, self.load(), self.address)
            except Exception as e:
                log.warning("reading the router snapshot failed: %r", e)
            self._wake.wait(self.refresh_s)
            self._wake.clear()

    def close(self):
        self._stop.set()
        self._wake.set()


def _recent(step_times, after: float) -> list[tuple[float, float, int]]:
    """The (end, seconds, batched tokens) of steps that ended after `after`; the engine thread appends
    meanwhile."""
    for _ in range(5):
        try:
            return [t for t in list(step_times) if t[0] > after]
        except RuntimeError:  # "deque mutated during iteration"
            continue
    return []


@serve.deployment(max_ongoing_requests=256, graceful_shutdown_wait_loop_s=0.1)
class AttentionReplica:
    def __init__(self, model_dir: str, engine_options: dict, placement: dict | None, router,
                 refresh_s: float = 1.0, expert_wait_s: float = 300.0, num_threads: int | None = 1,
                 dispatch_auth: dict | None = None, *, bind_host: str = "127.0.0.1", drain_s: float = 300.0):
        """placement: the expert groups' table, routed experts reached over gRPC; None: colocated,
        every routed expert loaded here (`expert_groups: 0`). num_threads: with remote experts,
        threads sharing each layer's attention calls and projection rows, torch itself running one,
        as its OpenMP team would sleep through every expert wait and wake at each small op
        (engine/attention_workers.py); colocated, torch's own threads (nothing to wait for) on
        the engine thread. None: every core this replica may run on but one.
        dispatch_auth: the cluster secret and TLS of the dispatch plane, for calls to expert
        replicas and on this replica's channel server (DispatchAuth.to_dict()'s shape; None:
        neither). Ingress replicas send requests over that channel (attention_channel.py), found
        at `bind_host` through the router; `drain_s`: how long a scale-down leaves running
        generations to finish."""
        self.router, self.drain_s = router, drain_s
        auth = DispatchAuth.from_dict(dispatch_auth) if dispatch_auth else None
        self.snapshots = RouterSnapshots(router, refresh_s)
        # torch's threads belong to the engine thread alone (async_engine.py says why): load here on one
        torch.set_num_threads(1)
        # colocated default: every core but one, which the ingress, HAProxy and Ray's daemons use (an
        # OpenMP team sharing its cores stalls at every barrier a preempted worker misses; vLLM's
        # CPU backend reserves one core the same way)
        share = num_threads  # the CPUs torch_threads / attention_resources give this replica, if they do
        num_threads = num_threads or max(1, len(os.sched_getaffinity(0)) - 1)
        # a GPU if this replica reserved one (num_gpus); the engine gets the device by name
        device = resolve_device(engine_options.get("device", "auto"), gpus_assigned=ray_gpus_assigned())
        engine_options = {**engine_options, "device": str(device)}
        if placement is None:
            # the C kernels (routed experts, decode attention) get every core (or the replica's share):
            # their threads take work items as they get free, so a thread the front end preempts holds
            # up one item, not a barrier; so do wide (prefill) steps, whose ops are large enough that a
            # preempted thread costs them little (BENCHMARKS.md, issue 18: +22% streamed on D, +17-23%
            # on C, 2 cores)
            cores = share or len(os.sched_getaffinity(0))
            engine_options = {"kernel_threads": cores, "wide_step_threads": cores, **engine_options}
            compute = select_compute(engine_options.get("expert_backend", "auto"), device,
                                     kernel_threads=engine_options["kernel_threads"])
            weights = load_weights(model_dir, dtype=engine_options.get("dtype", "auto"), dense=False, device=device,
                                   expert_backend=compute.name)
            self.experts, workers, engine_threads = LocalExperts(weights.experts, compute), 1, num_threads
            num_experts = load_model_config(model_dir).n_routed_experts
        else:
            engine_threads = 1
            # the version in force, which a rebalance may have moved on from the one the app was built with
            self.snapshots.read_once.wait(30)
            current = self.snapshots.placement
            table = Placement.from_dict(current if current and current.get("groups") else placement)
            self.experts = RemoteExperts(table, self.snapshots, policy=PowerOfTwoChoices(),
                                         unavailable_wait_s=expert_wait_s, auth=auth, device=device)
            # attention workers share CPU cores; on a GPU the kernels queue on one stream anyway
            workers, num_experts = (num_threads if device.type == "cpu" else 1), table.num_experts
            self.snapshots.on_placement = self._placement_published
        self.counter = RoutingCounter(self.experts, num_experts)
        self.snapshots.report = self.counter.take_report
        self.engine = AsyncLLMEngine(model_dir, EngineOptions(**{**engine_options, "attention_workers": workers}),
                                     experts=self.counter, num_threads=engine_threads)
        self.channel = AttentionChannelServer(self.engine, auth)
        self.io = EventLoopThread("attention-channel")
        address = self.io.run(self.channel.start(bind_host, 0))
        if bind_host in ("0.0.0.0", "::"):
            address = f"{ray.util.get_node_ip_address()}:{address.rsplit(':', 1)[1]}"
        self.snapshots.replica_id = serve.get_replica_context().replica_tag
        self.snapshots.address = address  # ingresses learn it from the router with the first report
        self.snapshots.load = self.load  # reported from now on, the engine being up

    async def generate(self, request: dict):
        """request: {"prompt_token_ids", "sampling_params": {...}, "request_id"?, "prompt"?, "stream"?};
        streams delta dicts, or with "stream": False one, the whole request (one message instead
        of one a step). Invalid requests raise ValueError before the first delta."""
        params = SamplingParams(**request.get("sampling_params", {}))
        request_id = request.get("request_id") or uuid.uuid4().hex
        async for delta in self.engine.generate(request_id, list(request["prompt_token_ids"]), params,
                                                request.get("prompt"), whole=request.get("stream") is False):
            yield delta_to_dict(delta)

    def resident(self) -> dict:
        """Parameter counts held here, to show no routed expert lives on the attention side (or,
        colocated, that they all do: `local_expert_params`)."""
        model = self.engine.engine.model
        names = [n for n, _ in model.named_parameters()]
        local = self.experts.numel() if isinstance(self.experts, LocalExperts) else 0
        return {"num_params": sum(p.numel() for p in model.parameters()), "local_expert_params": local,
                "routed_expert_params": sum(p.numel() for n, p in model.named_parameters()
                                            if ".experts." in n and "shared_experts" not in n),
                "parameter_names": names,
                "kv_blocks": self.engine.engine.limits.num_kv_blocks}

    def dispatch_stats(self) -> dict:
        """Counters since the last call: gRPC dispatch (calls, retries, bytes, serialise/wait/server
        compute seconds; none when colocated) and engine steps (count, seconds, batched tokens)."""
        # the engine thread keeps adding to its counters: take a copy and report the change since
        # the last call, never reset them under it
        engine = dict(self.engine.engine.step_stats)
        last, self._last_step_stats = getattr(self, "_last_step_stats", {}), engine
        transport = self.experts.stats.take() if isinstance(self.experts, RemoteExperts) else {}
        return {**transport, **{f"engine_{k}": v - last.get(k, 0) for k, v in engine.items()}}

    def _placement_published(self, placement: dict) -> None:
        """The router's placement in force: the engine switches to it at its next step, or now when
        it is idle (so it stops holding the old version in use). A step that starts meanwhile may
        go by both versions, layer by layer: still exact, as expert replicas hold both."""
        experts = self.experts
        if placement["version"] not in (experts.placement.version, getattr(self, "_next_version", None)):
            idle = not self.engine.engine.has_unfinished()
            log.info("placement version %d published: switching from version %d %s", placement["version"],
                     experts.placement.version, "now (idle)" if idle else "at the next step")
            experts.set_placement(Placement.from_dict(placement), now=idle)
            self._next_version = placement["version"]

    def step_times(self) -> list[tuple[float, float, int]]:
        """(monotonic end, seconds, batched tokens) of the engine's recent steps (the last 8192), for
        benchmarks."""
        return _recent(self.engine.engine.step_times, float("-inf"))

    def load(self) -> dict:
        """Demand on this replica: sequences running + waiting, and the KV cache's use (0..1); the
        placement version its steps use; its decode steps' (one token a sequence at most: their time
        depends on the batch, not on prompt lengths) longest time since the last report and median
        over the last minute."""
        s = self.engine.engine.scheduler.stats()
        used = s.num_used_blocks
        out = {"sequences": float(s.num_running + s.num_waiting), "running": float(s.num_running),
               "waiting": float(s.num_waiting), "kv_usage": used / max(1, used + s.num_free_blocks)}
        if isinstance(self.experts, RemoteExperts):
            out["placement_version"] = self.experts.placement.version
        now, since = time.monotonic(), getattr(self, "_last_load", 0.0)
        self._last_load = now
        decode = self.engine.engine.options.max_num_seqs
        times = [t for t in _recent(self.engine.engine.step_times, now - 60.0) if t[2] <= decode]
        if times:
            out["step_max_s"] = max((s for end, s, _ in times if end > since), default=0.0)
            out["step_median_s"] = statistics.median(s for _, s, _ in times)
        return out

    def record_autoscaling_stats(self) -> dict:
        """Serve's custom autoscaling metrics (glm_ray/serving/autoscaling.py reads them)."""
        load = self.load()
        return {SEQUENCES: load["sequences"], KV_USAGE: load["kv_usage"]}

    def engine_stats(self) -> dict:
        s = self.engine.engine.scheduler.stats()
        return {"running": s.num_running, "waiting": s.num_waiting, "used_blocks": s.num_used_blocks,
                "free_blocks": s.num_free_blocks, "computed_tokens": s.num_computed_tokens,
                "prefix_hit_tokens": s.num_prefix_hit_tokens, "preemptions": s.num_preemptions}

    def __del__(self):
        """Scale-down or shutdown: stop advertising the channel, refuse new requests (the ingress
        sends them elsewhere), give running generations `drain_s` to finish, end what is left
        with a retryable error, then stop. Runs even if __init__ failed part-way."""
        snapshots, channel, io = getattr(self, "snapshots", None), getattr(self, "channel", None), \
            getattr(self, "io", None)
        if snapshots is not None:
            snapshots.address = None
            try:
                self.router.unregister_attention.remote(snapshots.replica_id).result(timeout_s=5)
            except Exception as e:  # noqa: BLE001 - the router is gone too: its TTL drops us
                log.warning("unregistering the attention replica failed: %r", e)
        if channel is not None and io is not None:
            channel.draining = True
            deadline = time.monotonic() + self.drain_s
            if channel.running():
                log.info("attention replica draining: %d generation(s) running, %.0f s to finish",
                         channel.running(), self.drain_s)
            while channel.running() and time.monotonic() < deadline:
                time.sleep(0.1)
            cut = io.run(channel.fail_all(f"the attention replica serving it stopped after its drain limit "
                                          f"({self.drain_s:.0f} s); retry the request"), timeout=10)
            if cut:
                log.warning("attention replica drain limit: %d generation(s) ended with a retryable error", cut)
            io.run(channel.stop(1.0), timeout=10)
            io.stop()
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()
        if snapshots is not None:
            snapshots.close()
