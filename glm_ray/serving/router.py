"""`ExpertRouter`: placement table, replica registry with health, routing statistics.

One replica. Attention replicas read versioned snapshots of it off the hot path; expert replicas
register and heartbeat. Its methods are async so they run one at a time on the replica's loop.
"""

from __future__ import annotations

from collections import deque
import time

from ray import serve

from glm_ray.router.registry import ReplicaRegistry


@serve.deployment(name="ExpertRouter", num_replicas=1, max_ongoing_requests=1000)
class ExpertRouter:
    def __init__(self, placement: dict, num_groups: int, ttl_s: float, stats_window_s: float = 60.0):
        self.placement = placement
        self.registry = ReplicaRegistry(num_groups, ttl_s)
        self.window_s = stats_window_s
        self.routing: deque = deque()  # (time, {layer: [tokens per expert]})

    async def register(self, group: int, address: str, replica_id: str) -> int:
        return self.registry.register(group, address, replica_id)

    async def heartbeat(self, address: str, in_flight: int = 0, served_tokens: int = 0) -> bool:
        return self.registry.heartbeat(address, in_flight, served_tokens)

    async def unregister(self, address: str) -> None:
        self.registry.unregister(address)

    async def snapshot(self) -> dict:
        return {**self.registry.snapshot().to_dict(), "placement": self.placement}

    async def report_routing(self, counts: dict) -> None:
        """counts: {layer: [tokens routed to each expert]} since the reporter's last report."""
        now = time.monotonic()
        self.routing.append((now, counts))
        while self.routing and now - self.routing[0][0] > self.window_s:
            self.routing.popleft()

    async def status(self) -> dict:
        snap = self.registry.snapshot()
        tokens: dict[str, list[int]] = {}
        for _, counts in self.routing:
            for layer, per_expert in counts.items():
                acc = tokens.setdefault(str(layer), [0] * len(per_expert))
                for e, n in enumerate(per_expert):
                    acc[e] += n
        return {"placement": self.placement, "replicas": {str(g): a for g, a in snap.replicas.items()},
                "load": snap.load, "version": snap.version, "tokens_per_expert": tokens,
                "window_s": self.window_s, "missing_groups": [g for g, a in snap.replicas.items() if not a]}
