"""`ExpertRouter`: placement table, replica registry with health, routing statistics.

One replica. Attention replicas read versioned snapshots of it off the hot path; expert replicas
register and heartbeat. Its methods are async so they run one at a time on the replica's loop.
"""

from __future__ import annotations

from collections import deque
import time

from ray import serve

from glm_ray.router import balance
from glm_ray.router.registry import ReplicaRegistry


@serve.deployment(name="ExpertRouter", num_replicas=1, max_ongoing_requests=1000)
class ExpertRouter:
    def __init__(self, placement: dict, num_groups: int, ttl_s: float, stats_window_s: float = 60.0):
        self.placement = placement
        self.registry = ReplicaRegistry(num_groups, ttl_s)
        self.ttl_s = ttl_s
        self.window_s = stats_window_s
        self.routing: deque = deque()  # (time, {layer: [tokens per expert]})
        self.attention: dict[str, tuple[float, dict]] = {}  # replica id -> (time, its last load report)
        self.attention_addresses: dict[str, str] = {}  # replica id -> its channel address (registered, live)
        self.attention_draining: set[str] = set()  # replica ids that left for good

    async def register(self, group: int, address: str, replica_id: str) -> int:
        return self.registry.register(group, address, replica_id)

    async def heartbeat(self, address: str, in_flight: int = 0, busy_fraction: float = 0.0,
                        tokens_per_s: float = 0.0) -> bool:
        return self.registry.heartbeat(address, in_flight, busy_fraction, tokens_per_s)

    async def unregister(self, address: str) -> int:
        """Live replicas left in the address's group (0 if it was unknown)."""
        info = self.registry.replicas.get(address)
        self.registry.unregister(address)
        return 0 if info is None else len(self.registry.snapshot().replicas[info.group])

    async def snapshot(self) -> dict:
        return {**self.registry.snapshot().to_dict(), "placement": self.placement}

    async def report_routing(self, counts: dict) -> None:
        """counts: {layer: [tokens routed to each expert]} since the reporter's last report."""
        now = time.monotonic()
        self.routing.append((now, counts))
        while self.routing and now - self.routing[0][0] > self.window_s:
            self.routing.popleft()

    async def unregister_attention(self, replica_id: str) -> None:
        """A draining attention replica: no new requests (its running ones finish)."""
        self.attention_addresses.pop(replica_id, None)
        self.attention_draining.add(replica_id)  # a report still on its way must not bring it back

    async def attention_table(self) -> dict[str, str]:
        """{replica id: channel address} of the live attention replicas taking requests."""
        live = self._attention_load()
        return {r: a for r, a in sorted(self.attention_addresses.items()) if r in live}

    async def report_attention(self, replica_id: str, load: dict, address: str | None = None) -> None:
        """An attention replica's demand (sequences, KV usage), sent with each table refresh, and
        the address of its channel while it takes requests (a restarted router learns it again)."""
        self.attention[replica_id] = (time.monotonic(), load)
        if address and replica_id not in self.attention_draining:
            self.attention_addresses[replica_id] = address

    def _attention_load(self) -> dict[str, dict]:
        # a silent replica (crashed, or its refresh stalled) drops out after a few refreshes' worth
        now = time.monotonic()
        self.attention = {r: (t, load) for r, (t, load) in self.attention.items() if now - t <= 3 * self.ttl_s}
        self.attention_addresses = {r: a for r, a in self.attention_addresses.items() if r in self.attention}
        return {r: load for r, (_, load) in sorted(self.attention.items()) if load}

    async def status(self) -> dict:
        snap = self.registry.snapshot()
        tokens: dict[str, list[int]] = {}
        for _, counts in self.routing:
            for layer, per_expert in counts.items():
                acc = tokens.setdefault(str(layer), [0] * len(per_expert))
                for e, n in enumerate(per_expert):
                    acc[e] += n
        rates: dict[str, list[float]] = {}
        for r in self.registry.replicas.values():
            rates.setdefault(str(r.group), []).append(r.tokens_per_s)
        return {"placement": self.placement, "replicas": {str(g): a for g, a in snap.replicas.items()},
                "balancedness": balance.summarize(tokens, (self.placement or {}).get("groups") or [], rates),
                "load": snap.load, "version": snap.version, "tokens_per_expert": tokens,
                "groups": {str(g): v for g, v in self.registry.group_load().items()},
                "replica_load": {a: {"group": r.group, "in_flight": r.in_flight, "busy_fraction": r.busy_fraction,
                                     "tokens_per_s": r.tokens_per_s} for a, r in self.registry.replicas.items()},
                "attention": self._attention_load(),
                "window_s": self.window_s, "missing_groups": [g for g, a in snap.replicas.items() if not a]}
