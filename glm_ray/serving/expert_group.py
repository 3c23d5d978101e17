"""`ExpertGroup_<g>`: the routed experts of one group for every MoE layer, served over gRPC.

Each replica loads only its group's expert tensors, serves `ExpertService` on its own port from a
dedicated thread (its event loop never waits on the replica's), registers with the router and
heartbeats; it unregisters when Serve shuts it down. `dispatch_auth` (DispatchAuth.to_dict()'s
shape) sets the cluster secret calls must carry and TLS for the port.
"""

from __future__ import annotations

import asyncio
import logging
import threading

import ray
import torch
from ray import serve

from glm_ray.config import load_model_config
from glm_ray.engine.memory import retain_freed_memory
from glm_ray.experts.auth import DispatchAuth
from glm_ray.experts.server import ExpertServer
from glm_ray.model.loader import load_weights

log = logging.getLogger("glm_ray.expert_group")


class _LoopThread:
    """An asyncio loop in its own thread, for the gRPC server."""

    def __init__(self, name: str):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float | None = None):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self):
        self.loop.call_soon_threadsafe(self.loop.stop)


@serve.deployment(max_ongoing_requests=100, graceful_shutdown_wait_loop_s=0.1)
class ExpertGroup:
    async def __init__(self, model_dir: str, group: int, expert_ids: list[int], dtype: str, router,
                       bind_host: str = "127.0.0.1", heartbeat_interval_s: float = 0.5, num_threads: int = 1,
                       dispatch_auth: dict | None = None):
        auth = DispatchAuth.from_dict(dispatch_auth) if dispatch_auth else None
        if auth is not None:
            auth.server_credentials()  # a bad TLS file fails now, not after loading the weights
        torch.set_num_threads(num_threads)
        retain_freed_memory()  # as the engine does: per-call temporaries must not page-fault
        self.group, self.expert_ids, self.router = group, list(expert_ids), router
        self.heartbeat_interval_s = heartbeat_interval_s
        config = load_model_config(model_dir)
        weights = await asyncio.to_thread(load_weights, model_dir, config, dtype=dtype, dense=False,
                                          expert_ids=self.expert_ids)
        self.num_params = sum(w.numel() for w in weights.experts.values())  # resident routed-expert parameters
        self.read_names = weights.read_names
        self.server = ExpertServer(weights.experts, group, auth=auth)
        self.io = _LoopThread(f"expert-group-{group}-grpc")
        address = self.io.run(self.server.start(bind_host, 0))
        if bind_host in ("0.0.0.0", "::"):
            address = f"{ray.util.get_node_ip_address()}:{address.rsplit(':', 1)[1]}"
        self.address = address
        self.replica_id = serve.get_replica_context().replica_tag
        await self.router.register.remote(group, self.address, self.replica_id)
        self._stopping = False
        self._heartbeats = asyncio.get_running_loop().create_task(self._heartbeat())

    async def _heartbeat(self):
        while not self._stopping:
            try:
                known = await self.router.heartbeat.remote(self.address, self.server.in_flight,
                                                           self.server.num_calls)
                if not known:  # expired while we were slow: come back
                    await self.router.register.remote(self.group, self.address, self.replica_id)
            except Exception as e:  # the router restarting must not kill the replica
                log.warning("heartbeat to the router failed: %r", e)
            await asyncio.sleep(self.heartbeat_interval_s)

    def info(self) -> dict:
        return {"group": self.group, "address": self.address, "expert_ids": self.expert_ids,
                "num_params": self.num_params, "read_names": self.read_names}

    def record_autoscaling_stats(self) -> dict:
        return {"in_flight": float(self.server.in_flight)}

    async def __del__(self):
        self._stopping = True
        try:
            await self.router.unregister.remote(self.address)
        except Exception:
            pass
        try:
            self.io.run(self.server.stop(1.0), timeout=5)
        finally:
            self.io.stop()
