"""`ExpertGroup_<g>`: the routed experts of one group for every MoE layer, served over gRPC.

Each replica loads only its group's expert tensors, serves `ExpertService` on its own port from a
dedicated thread (its event loop never waits on the replica's), registers with the router and
heartbeats its load (busy fraction and tokens per second over `look_back_s`, also its autoscaling
metrics). `dispatch_auth` (DispatchAuth.to_dict()'s shape) sets the cluster secret calls must
carry and TLS for the port.

Scale-down loses nothing: Serve sees none of the gRPC traffic, so the replica drains itself when
Serve shuts it down (`__del__`): it leaves the routing table, keeps serving for `drain_wait_s`
while attention replicas may still hold a table that lists it (they re-read it every
`snapshot_refresh_s`), then finishes the requests being computed and stops. Serve's
`graceful_shutdown_timeout_s` must cover that (ServeConfig checks).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import ray
import torch
from ray import serve

from glm_ray.config import load_model_config
from glm_ray.engine.memory import retain_freed_memory
from glm_ray.experts.auth import DispatchAuth
from glm_ray.experts.drain import drain
from glm_ray.experts.remote import EventLoopThread
from glm_ray.experts.server import ExpertServer
from glm_ray.model.loader import load_weights
from glm_ray.serving.autoscaling import BUSY, TOKENS

log = logging.getLogger("glm_ray.expert_group")


@serve.deployment(max_ongoing_requests=100, graceful_shutdown_wait_loop_s=0.1)
class ExpertGroup:
    async def __init__(self, model_dir: str, group: int, expert_ids: list[int], dtype: str, router,
                       bind_host: str = "127.0.0.1", heartbeat_interval_s: float = 0.5, num_threads: int = 1,
                       dispatch_auth: dict | None = None, *, look_back_s: float = 10.0, drain_wait_s: float = 2.5,
                       stop_grace_s: float = 2.0):
        auth = DispatchAuth.from_dict(dispatch_auth) if dispatch_auth else None
        if auth is not None:
            auth.server_credentials()  # a bad TLS file fails now, not after loading the weights
        torch.set_num_threads(1)  # loading; the server's compute threads get num_threads (async_engine.py: why)
        retain_freed_memory()  # as the engine does: per-call temporaries must not page-fault
        self.group, self.expert_ids, self.router = group, list(expert_ids), router
        self.heartbeat_interval_s, self.look_back_s = heartbeat_interval_s, look_back_s
        self.drain_wait_s, self.stop_grace_s = drain_wait_s, stop_grace_s
        config = load_model_config(model_dir)
        weights = await asyncio.to_thread(load_weights, model_dir, config, dtype=dtype, dense=False,
                                          expert_ids=self.expert_ids)
        self.num_params = sum(w.numel() for w in weights.experts.values())  # resident routed-expert parameters
        self.read_names = weights.read_names
        self.server = ExpertServer(weights.experts, group, auth=auth, load_window_s=look_back_s,
                                   num_threads=num_threads)
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

    async def _heartbeat(self):
        while not self._stopping:
            try:
                busy, tokens = self.server.load.rates(self.look_back_s)
                known = await self.router.heartbeat.remote(self.address, self.server.in_flight, busy, tokens)
                if not known and not self._stopping:  # expired while we were slow: come back
                    await self.router.register.remote(self.group, self.address, self.replica_id)
            except Exception as e:  # the router restarting must not kill the replica
                log.warning("heartbeat to the router failed: %r", e)
            await asyncio.sleep(self.heartbeat_interval_s)

    def info(self) -> dict:
        return {"group": self.group, "address": self.address, "expert_ids": self.expert_ids,
                "num_params": self.num_params, "read_names": self.read_names}

    def record_autoscaling_stats(self) -> dict:
        """Serve's custom autoscaling metrics (glm_ray/serving/autoscaling.py reads them)."""
        busy, tokens = self.server.load.rates(self.look_back_s)
        return {BUSY: busy, TOKENS: tokens}

    async def __del__(self):
        """Drain, then stop (see the module docstring). Runs even if __init__ failed part-way."""
        self._stopping = True
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
