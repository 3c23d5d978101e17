"""`ExpertGroup_<g>`: the routed experts of one group for every MoE layer, served over gRPC.

Each replica loads only its group's expert tensors, serves `ExpertService` on its own port from a
dedicated thread (its event loop never waits on the replica's), registers with the router and
heartbeats its load (busy fraction and tokens per second over `look_back_s`, also its autoscaling
metrics). `dispatch_auth` (DispatchAuth.to_dict()'s shape) sets the cluster secret calls must
carry and TLS for the port.

Placement versions (router/rebalance.py): a replica starts with the version in force, as the router
says (so a replica started after a rebalance holds the current slots). With each heartbeat it
syncs: when the router names a version it does not hold, it builds that version's slots while it
goes on serving, then serves both; versions the router no longer lists are freed. The new stacks
are filled one expert at a time (copied from what it holds, or read from the checkpoint) on the
gRPC loop thread, between the requests it computes there, and paced (experts/slots.py): a builder
thread of its own contends with that thread for the GIL and the cores for the whole build, which
measured slower steps (BENCHMARKS.md).

Scale-down loses nothing: Serve sees none of the gRPC traffic, so the replica drains itself when
Serve shuts it down (`__del__`): it leaves the routing table, keeps serving for `drain_wait_s`
while attention replicas may still hold a table that lists it (they re-read it every
`snapshot_refresh_s`), then finishes the requests being computed and stops. Serve's
`graceful_shutdown_timeout_s` must cover that (ServeConfig checks).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time

import ray
import torch
from ray import serve

from glm_ray.config import load_model_config
from glm_ray.engine.memory import retain_freed_memory
from glm_ray.experts.auth import DispatchAuth
from glm_ray.device import ray_gpus_assigned, resolve_device
from glm_ray.experts.compute import select_compute
from glm_ray.experts.drain import drain
from glm_ray.experts.remote import EventLoopThread
from glm_ray.experts.server import ExpertServer
from glm_ray.experts.slots import LayerBuild, missing
from glm_ray.model.loader import ExpertReader, load_weights
from glm_ray.serving.autoscaling import BUSY, TOKENS

log = logging.getLogger("glm_ray.expert_group")
BUILD_PACE = 10.0  # after each expert copied on the gRPC loop, leave it this many times as long to requests


@serve.deployment(max_ongoing_requests=100, graceful_shutdown_wait_loop_s=0.1)
class ExpertGroup:
    async def __init__(self, model_dir: str, group: int, expert_ids: list[int], dtype: str, router,
                       bind_host: str = "127.0.0.1", heartbeat_interval_s: float = 0.5, num_threads: int = 1,
                       dispatch_auth: dict | None = None, *, look_back_s: float = 10.0, drain_wait_s: float = 2.5,
                       stop_grace_s: float = 2.0, device: str = "auto", expert_backend: str = "auto"):
        auth = DispatchAuth.from_dict(dispatch_auth) if dispatch_auth else None
        if auth is not None:
            auth.server_credentials()  # a bad TLS file fails now, not after loading the weights
        torch.set_num_threads(1)  # loading; the server's compute threads get num_threads (async_engine.py: why)
        retain_freed_memory()  # as the engine does: per-call temporaries must not page-fault
        self.group, self.expert_ids, self.router = group, list(expert_ids), router
        self.heartbeat_interval_s, self.look_back_s = heartbeat_interval_s, look_back_s
        self.drain_wait_s, self.stop_grace_s = drain_wait_s, stop_grace_s
        self.model_dir, self.dtype = model_dir, dtype
        self.config = config = load_model_config(model_dir)
        in_force = await self.router.placement_in_force.remote(group)  # a rebalance may have moved the slots
        self.expert_ids = list(in_force["expert_ids"])
        # a GPU if this replica reserved one (num_gpus); a backend that cannot run fails before loading
        self.device = resolve_device(device, gpus_assigned=ray_gpus_assigned())
        compute = select_compute(expert_backend, self.device)
        weights = await asyncio.to_thread(load_weights, model_dir, config, dtype=dtype, dense=False,
                                          expert_ids=self.expert_ids, device=self.device,
                                          expert_backend=compute.name)
        self.read_names = weights.read_names
        self.server = ExpertServer(weights.experts, group, placement_version=in_force["version"], auth=auth,
                                   load_window_s=look_back_s, num_threads=num_threads, compute=compute)
        log.info("expert group %d on %s, expert backend %s%s", group, self.device, compute.name,
                 f" ({compute.note})" if compute.note else "")
        self._building: asyncio.Task | None = None  # a version's slots being built
        self._failure: dict | None = None  # the last version that could not be built, told to the router once
        self._built: dict | None = None  # the last version built and its seconds, told to the router once
        self.io = EventLoopThread(f"expert-group-{group}-grpc")
        address = self.io.run(self.server.start(bind_host, 0))
        if bind_host in ("0.0.0.0", "::"):
            address = f"{ray.util.get_node_ip_address()}:{address.rsplit(':', 1)[1]}"
        self.address = address
        self.replica_id = serve.get_replica_context().replica_tag
        # registered only now, weights loaded and the server up: no traffic reaches a replica before
        await self.router.register.remote(group, self.address, self.replica_id)
        self._stopping = False
        self._heartbeats = asyncio.get_running_loop().create_task(self._heartbeat())

    @property
    def num_params(self) -> int:
        """Resident routed-expert parameters (every version held)."""
        return self.server.numel()

    async def _heartbeat(self):
        while not self._stopping:
            try:
                busy, tokens = self.server.load.rates(self.look_back_s)
                known = await self.router.heartbeat.remote(self.address, self.server.in_flight, busy, tokens)
                if not known and not self._stopping:  # expired while we were slow: come back
                    await self.router.register.remote(self.group, self.address, self.replica_id)
                await self._sync_placement()
            except Exception as e:  # the router restarting must not kill the replica
                log.warning("heartbeat to the router failed: %r", e)
            await asyncio.sleep(self.heartbeat_interval_s)

    async def _sync_placement(self):
        failure, built = self._failure, self._built
        sync = await self.router.placement_sync.remote(self.group, self.address, sorted(self.server.versions),
                                                       failure, built)
        if self._failure is failure:  # told (a build that ended meanwhile is told next time)
            self._failure = None
        if self._built is built:
            self._built = None
        target = sync["target"]
        building = self._building is not None and not self._building.done()
        if target["version"] not in self.server.versions and not building:
            self._building = asyncio.get_running_loop().create_task(self._build(target["version"],
                                                                                target["expert_ids"]))
        dropped = self.server.retire(set(sync["keep"]))
        if dropped:
            log.info("expert group %d: placement versions %s retired", self.group, dropped)

    async def _build(self, version: int, expert_ids: list[int]):
        """Builds `version`'s slots beside the ones served, one expert at a time on the gRPC loop
        between the requests it computes (paced by BUILD_PACE), then serves them too."""
        loop = asyncio.get_running_loop()
        start = loop.time()

        async def one_expert(build):
            t0 = time.perf_counter()
            build.step()
            return time.perf_counter() - t0

        try:
            held = self.server.layers
            reader = ExpertReader(self.model_dir, self.config, self.dtype, self.device) if missing(held, expert_ids) else None
            layers, longest = {}, 0.0
            for layer, old in held.items():  # one expert at a time, between the requests served
                read = functools.partial(reader.read_into, layer) if reader else None
                build = LayerBuild(old, None, expert_ids, read)
                for _ in build.want:
                    took = await asyncio.wrap_future(self.io.submit(one_expert(build)))
                    longest = max(longest, took)
                    await asyncio.sleep(BUILD_PACE * took)  # the loop spends at most 1 / (1 + BUILD_PACE) building
                layers[layer] = build.result()
            self.server.add_version(version, layers)
            self.expert_ids = list(expert_ids)
            self._built = {"version": version, "seconds": loop.time() - start, "longest_chunk_s": longest}
            log.info("expert group %d: placement version %d built in %.1f s (experts %s)", self.group, version,
                     self._built["seconds"], expert_ids)
        except Exception as e:  # noqa: BLE001 - the router abandons the version; the one in force goes on
            log.error("expert group %d: building placement version %d failed: %r", self.group, version, e)
            self._failure = {"version": version, "error": f"{type(e).__name__}: {e}"}

    def info(self) -> dict:
        return {"group": self.group, "address": self.address, "expert_ids": self.expert_ids,
                "num_params": self.num_params, "read_names": self.read_names,
                "placement_versions": sorted(self.server.versions)}

    def record_autoscaling_stats(self) -> dict:
        """Serve's custom autoscaling metrics (glm_ray/serving/autoscaling.py reads them)."""
        busy, tokens = self.server.load.rates(self.look_back_s)
        return {BUSY: busy, TOKENS: tokens}

    async def __del__(self):
        """Drain, then stop (see the module docstring). Runs even if __init__ failed part-way."""
        self._stopping = True
        building = getattr(self, "_building", None)
        if building is not None:
            building.cancel()
        heartbeats = getattr(self, "_heartbeats", None)
        if heartbeats is not None:
            heartbeats.cancel()
            with contextlib.suppress(BaseException):
                await heartbeats
        io = getattr(self, "io", None)
        if io is None:
            return

        async def leave() -> int:
            return await asyncio.wait_for(self.router.unregister.remote(self.address), 5.0)

        async def stop() -> None:
            await asyncio.wrap_future(io.submit(self.server.stop(self.stop_grace_s)))

        try:
            if getattr(self, "address", None) is not None:
                await drain(leave, stop, self.drain_wait_s, f"expert group {self.group} replica {self.address}")
            else:
                await stop()
        finally:
            io.stop()
