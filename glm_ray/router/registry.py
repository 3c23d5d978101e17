"""The expert-replica registry: which replica of which group is alive, and how busy.

Plain Python (no Ray): the `ExpertRouter` deployment wraps it. Replicas register, then heartbeat;
one whose last heartbeat is older than `ttl_s` leaves the table (a crashed replica never says
goodbye). Every change bumps `version`, so attention replicas can tell a stale snapshot.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class ReplicaInfo:
    group: int
    address: str
    replica_id: str
    last_seen: float
    in_flight: int = 0  # calls being computed at the last heartbeat
    busy_fraction: float = 0.0  # seconds computing per wall second, over the replica's look-back window
    tokens_per_s: float = 0.0  # tokens computed per second, same window


@dataclass
class Snapshot:
    version: int
    replicas: dict[int, list[str]]  # group -> live addresses
    load: dict[str, int] = field(default_factory=dict)  # address -> in-flight calls

    def to_dict(self) -> dict:
        return {"version": self.version, "replicas": {str(g): a for g, a in self.replicas.items()}, "load": self.load}

    @classmethod
    def from_dict(cls, d: dict) -> Snapshot:
        return cls(d["version"], {int(g): list(a) for g, a in d["replicas"].items()}, dict(d.get("load", {})))


class ReplicaRegistry:
    def __init__(self, num_groups: int, ttl_s: float = 3.0, clock=time.monotonic):
        self.num_groups = num_groups
        self.ttl_s = ttl_s
        self.clock = clock
        self.replicas: dict[str, ReplicaInfo] = {}
        self.version = 0
        self._missing_since: dict[int, float] = {}  # group -> when it was last seen without a live replica

    def register(self, group: int, address: str, replica_id: str) -> int:
        if not 0 <= group < self.num_groups:
            raise ValueError(f"group {group} out of range 0..{self.num_groups - 1}")
        self.replicas[address] = ReplicaInfo(group, address, replica_id, self.clock())
        self.version += 1
        return self.version

    def heartbeat(self, address: str, in_flight: int = 0, busy_fraction: float = 0.0,
                  tokens_per_s: float = 0.0) -> bool:
        """The replica's load now; False if the address is unknown (expired or never registered):
        the replica should re-register."""
        info = self.replicas.get(address)
        if info is None:
            return False
        info.last_seen, info.in_flight = self.clock(), in_flight
        info.busy_fraction, info.tokens_per_s = busy_fraction, tokens_per_s
        return True

    def group_load(self) -> dict[int, dict]:
        """Per group: live replicas, summed and mean busy fraction, summed tokens per second."""
        self.expire()
        out = {g: {"replicas": 0, "busy_sum": 0.0, "tokens_per_s": 0.0} for g in range(self.num_groups)}
        for r in self.replicas.values():
            g = out[r.group]
            g["replicas"] += 1
            g["busy_sum"] += r.busy_fraction
            g["tokens_per_s"] += r.tokens_per_s
        for g in out.values():
            g["busy_fraction"] = g["busy_sum"] / g["replicas"] if g["replicas"] else 0.0
        return out

    def unregister(self, address: str) -> None:
        if self.replicas.pop(address, None) is not None:
            self.version += 1

    def expire(self) -> list[str]:
        now = self.clock()
        dead = [a for a, r in self.replicas.items() if now - r.last_seen > self.ttl_s]
        for address in dead:
            self.unregister(address)
        return dead

    def snapshot(self) -> Snapshot:
        self.expire()
        groups: dict[int, list[str]] = {g: [] for g in range(self.num_groups)}
        for r in sorted(self.replicas.values(), key=lambda r: r.address):
            groups[r.group].append(r.address)
        now = self.clock()
        for g, addresses in groups.items():
            if addresses:
                self._missing_since.pop(g, None)
            else:
                self._missing_since.setdefault(g, now)
        return Snapshot(self.version, groups, {a: r.in_flight for a, r in self.replicas.items()})

    def missing_groups(self) -> list[int]:
        snap = self.snapshot()
        return [g for g, addrs in snap.replicas.items() if not addrs]

    def missing_for(self) -> dict[int, float]:
        """Groups without a live replica now, and for how many seconds (since this registry first
        saw them so: at start-up, since it started)."""
        self.snapshot()
        now = self.clock()
        return {g: now - since for g, since in sorted(self._missing_since.items())}
