"""An expert replica drained while a client streams to it (real gRPC servers on 127.0.0.1, no Ray):
it leaves a ReplicaRegistry, a client that re-reads the registry every 0.2 s (as attention
replicas re-read the router's table) moves its later requests to the other replica, what the
drained replica was computing completes on it, and nothing fails or is retried."""

import asyncio
import threading
import time

import torch

from glm_ray.experts.drain import drain
from glm_ray.experts.local import LocalExperts
from glm_ray.experts.remote import RemoteExperts
from glm_ray.model.loader import load_weights
from glm_ray.router.placement import Placement
from glm_ray.router.registry import ReplicaRegistry

from .test_remote_experts import config, loop, random_routing, start_servers, stop_all  # noqa: F401 - fixtures

REFRESH_S = 0.2


class RegistrySnapshots:
    """A client's copy of the registry's table, re-read every REFRESH_S by a thread (RouterSnapshots' role)."""

    def __init__(self, registry: ReplicaRegistry):
        self.registry = registry
        self.current = registry.snapshot().replicas
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.wait(REFRESH_S):
            self.current = self.registry.snapshot().replicas

    def snapshot(self):
        return self.current

    def close(self):
        self._stop.set()


def test_a_drained_replica_finishes_its_work_and_hands_over(tiny_model_dir, config, loop):  # noqa: F811
    placement = Placement.contiguous(config.n_routed_experts, 1)
    servers, static = start_servers(loop, tiny_model_dir, placement, copies=2, own_loops=True)
    draining, staying = servers[0]
    registry = ReplicaRegistry(num_groups=1, ttl_s=60)
    for i, s in enumerate(servers[0]):
        registry.register(0, s.address, f"r{i}")
    snapshots = RegistrySnapshots(registry)
    local = LocalExperts(load_weights(tiny_model_dir, dtype="float32", dense=False).experts)
    layer = min(local.layers)
    calls, errors = [], []
    stop = threading.Event()
    try:
        with RemoteExperts(placement, snapshots) as remote:
            def client(seed):
                while not stop.is_set():
                    hidden_states, topk_ids, topk_weights = random_routing(config, 8, seed=seed)
                    try:
                        got = remote.forward(layer, hidden_states, topk_ids, topk_weights)
                    except Exception as e:  # noqa: BLE001 - any failure fails the test below
                        errors.append(e)
                        return
                    calls.append((got, local.forward(layer, hidden_states, topk_ids, topk_weights)))
                    seed += 2

            threads = [threading.Thread(target=client, args=(seed,)) for seed in (0, 1)]
            for t in threads:
                t.start()
            deadline = time.monotonic() + 30
            while draining.num_calls < 20 and time.monotonic() < deadline:  # both replicas busy
                time.sleep(0.01)
            assert draining.num_calls >= 20 and staying.num_calls > 0

            async def leave():
                registry.unregister(draining.address)
                return len(registry.snapshot().replicas[0])

            async def stop_server():
                await asyncio.wrap_future(draining.test_loop.submit(draining.stop(5.0)))

            staying_before = staying.num_calls
            waited = asyncio.run(drain(leave, stop_server, wait_s=3 * REFRESH_S, name="replica 0"))
            time.sleep(0.5)  # traffic goes on, on the other replica alone
            stop.set()
            for t in threads:
                t.join(timeout=30)
            assert waited
            assert not errors, errors
            assert remote.stats.retries == 0  # nothing was cut and sent again
            assert draining.in_flight == 0
            assert staying.num_calls - staying_before > 20  # the later requests went to the other replica
            assert len(calls) > 60
            for got, want in calls:
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    finally:
        stop.set()
        snapshots.close()
        stop_all(loop, servers)
