"""`ExpertRouter`: placement table, replica registry with health, routing statistics, rebalancing.

One replica. Attention replicas read versioned snapshots of it off the hot path; expert replicas
register, heartbeat and sync their placement versions (`placement_sync`, each heartbeat). A
rebalance (router/rebalance.py) is started on demand (`rebalance`) or when the window's
balancedness falls below `rebalance_threshold` (checked every `rebalance_interval_s`, on the
calls that arrive anyway). Its methods are async so they run one at a time on the replica's loop.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections import deque

from ray import serve

from glm_ray.router import balance
from glm_ray.serving import placement_state
from glm_ray.router.placement import Placement
from glm_ray.router.rebalance import Rebalancer, RebalanceRefused, dispatched_loads
from glm_ray.router.registry import ReplicaRegistry

log = logging.getLogger("glm_ray.router")


@serve.deployment(name="ExpertRouter", num_replicas=1, max_ongoing_requests=1000)
class ExpertRouter:
    def __init__(self, placement: dict, num_groups: int, ttl_s: float, stats_window_s: float = 60.0, *,
                 redundant_experts: int = 0, rebalance_threshold: float = 0.0, rebalance_interval_s: float = 60.0,
                 rebalance_timeout_s: float = 600.0, state_key: str | None = None):
        """state_key: where in the cluster's key-value store (Ray's GCS) the placement in force is kept,
        so a router that restarts after a rebalance goes on from it (None: not kept)."""
        self.state_key = state_key
        self.rebalancer = None
        if placement.get("groups"):
            self.rebalancer = Rebalancer(Placement.from_dict(placement), redundant_experts,
                                         load_timeout_s=rebalance_timeout_s)
            self._restore()
        self.registry = ReplicaRegistry(num_groups, ttl_s)
        self.ttl_s = ttl_s
        self.window_s = stats_window_s
        self.rebalance_threshold, self.rebalance_interval_s = rebalance_threshold, rebalance_interval_s
        self._last_check = time.monotonic()
        self.routing: deque = deque()  # (time, {layer: [tokens per expert]}, {version: {layer: [pairs per group]}})
        self.attention: dict[str, tuple[float, dict]] = {}  # replica id -> (time, its last load report)
        self.attention_addresses: dict[str, str] = {}  # replica id -> its channel address (registered, live)
        self.attention_draining: set[str] = set()  # replica ids that left for good

    # -- the placement kept across restarts ------------------------------------------------------

    def _restore(self) -> None:
        """A restarted router takes the placement its predecessor published, and never reuses a
        version number it proposed: replicas may hold a version that was never published."""
        saved = placement_state.load(self.state_key)
        if saved is None:
            return
        r = self.rebalancer
        kept = Placement.from_dict(saved["placement"])
        fits = (kept.num_experts, kept.num_groups) == (r.current.num_experts, r.current.num_groups) and \
            max(len(g) for g in kept.groups) <= r.slots_per_group
        if fits and kept.version >= r.current.version:
            r.current = kept
            r.next_version = max(r.next_version, int(saved["next_version"]), kept.version + 1)
            log.info("restored placement version %d from the cluster's store", kept.version)

    def _save(self) -> None:
        if self.rebalancer is not None:
            placement_state.save(self.state_key, self.rebalancer.current.to_dict(), self.rebalancer.next_version)

    async def register(self, group: int, address: str, replica_id: str) -> int:
        return self.registry.register(group, address, replica_id)

    async def heartbeat(self, address: str, in_flight: int = 0, busy_fraction: float = 0.0,
                        tokens_per_s: float = 0.0) -> bool:
        return self.registry.heartbeat(address, in_flight, busy_fraction, tokens_per_s)

    async def unregister(self, address: str) -> int:
        """Live replicas left in the address's group (0 if it was unknown)."""
        info = self.registry.replicas.get(address)
        self.registry.unregister(address)
        if self.rebalancer is not None:
            self.rebalancer.forget(address)
        return 0 if info is None else len(self.registry.snapshot().replicas[info.group])

    @property
    def placement(self) -> dict:
        return self.rebalancer.current.to_dict() if self.rebalancer else {"version": 0, "groups": []}

    async def snapshot(self) -> dict:
        return {**self.registry.snapshot().to_dict(), "placement": self.placement}

    # -- placement versions --------------------------------------------------------------------

    async def placement_in_force(self, group: int) -> dict:
        """{"version", "expert_ids"} a new replica of `group` loads first."""
        return self.rebalancer.in_force(group)

    async def placement_sync(self, group: int, address: str, held: list[int], failure: dict | None = None,
                             built: dict | None = None) -> dict:
        """An expert replica's versions held (and a failure to build one, or the seconds it took to
        build one) -> {"target": {"version", "expert_ids"} to hold, "keep": versions not to drop}.
        Publishes a pending version once held."""
        r = self.rebalancer
        r.report(address, held, failure)
        if built and r.last and r.last.get("version") == built.get("version"):
            r.last.setdefault("builds", {})[address] = {k: v for k, v in built.items() if k != "version"}
        if r.try_publish(self.registry.snapshot().replicas):
            log.info("placement version %d published after %.1f s", r.current.version, r.last["seconds"])
            self._save()
        self._maybe_rebalance()
        return {"target": r.target(group), "keep": r.keep(self._attention_versions())}

    async def rebalance(self, reason: str = "requested") -> dict:
        """Start a rebalance now: balancedness before (measured over the window) and predicted after;
        RebalanceRefused (a ValueError) when one is under way or nothing was routed yet."""
        if self.rebalancer is None:
            raise RebalanceRefused("colocated (expert_groups 0): there are no expert groups to rebalance")
        return self._propose(reason, self._balancedness())

    def _propose(self, reason: str, measured: dict) -> dict:
        record = self.rebalancer.propose(self._tokens_per_expert(), reason,
                                         {k: measured[k] for k in ("layers", "min", "mean")})
        if record["changed"]:
            self._save()  # the version number is taken, published or not
            record["steps_before"], record["longest_step_s"] = self._step_summary(), 0.0
            log.info("rebalance (%s) to placement version %d: balancedness %.3f -> %.3f predicted", reason,
                     record["version"], record["predicted_before"]["min"], record["predicted_after"]["min"])
        return record

    def _maybe_rebalance(self) -> None:
        now = time.monotonic()
        if not self.rebalance_threshold or now - self._last_check < self.rebalance_interval_s:
            return
        self._last_check = now
        measured = self._balancedness()
        low = measured["min"] is not None and measured["min"] < self.rebalance_threshold
        if low and self.rebalancer.pending is None:
            try:
                self._propose(f"balancedness {measured['min']:.3f} below {self.rebalance_threshold}", measured)
            except RebalanceRefused:
                pass

    def _attention_versions(self) -> list[int]:
        return [int(load["placement_version"]) for load in self._attention_load().values()
                if "placement_version" in load]

    def _step_summary(self) -> dict:
        medians = [load["step_median_s"] for load in self._attention_load().values() if load.get("step_median_s")]
        return {"median_step_s": statistics.median(medians) if medians else None}

    # -- routing statistics --------------------------------------------------------------------

    async def report_routing(self, counts: dict, group_pairs: dict | None = None) -> None:
        """counts: {layer: [tokens routed to each expert]} since the reporter's last report;
        group_pairs: {placement version: {layer: [(token, expert) pairs sent to each group]}}."""
        now = time.monotonic()
        self.routing.append((now, counts, group_pairs or {}))
        while self.routing and now - self.routing[0][0] > self.window_s:
            self.routing.popleft()

    def _tokens_per_expert(self) -> dict[str, list[int]]:
        tokens: dict[str, list[int]] = {}
        for _, counts, _ in self.routing:
            for layer, per_expert in counts.items():
                acc = tokens.setdefault(str(layer), [0] * len(per_expert))
                for e, n in enumerate(per_expert):
                    acc[e] += n
        return tokens

    def _group_tokens(self) -> dict[str, list[float]]:
        """{layer: pairs each group computed} under the placement in force: as attention replicas
        reported sending them, else (nothing reported for this version) split over copies as batches are."""
        version = str(self.placement["version"])
        out: dict[str, list[float]] = {}
        for _, _, pairs in self.routing:
            for layer, per_group in (pairs.get(version) or pairs.get(int(version)) or {}).items():
                acc = out.setdefault(str(layer), [0] * len(per_group))
                for g, n in enumerate(per_group):
                    acc[g] += n
        if out or self.rebalancer is None:
            return out
        groups = self.placement["groups"]
        return {layer: dispatched_loads(groups, per_expert) for layer, per_expert in self._tokens_per_expert().items()}

    def _balancedness(self) -> dict:
        rates: dict[str, list[float]] = {}
        for r in self.registry.replicas.values():
            rates.setdefault(str(r.group), []).append(r.tokens_per_s)
        return balance.summarize(self._group_tokens(), rates)

    async def unregister_attention(self, replica_id: str) -> None:
        """A draining attention replica: no new requests (its running ones finish)."""
        self.attention_addresses.pop(replica_id, None)
        self.attention_draining.add(replica_id)  # a report still on its way must not bring it back

    async def attention_table(self) -> dict[str, str]:
        """{replica id: channel address} of the live attention replicas taking requests."""
        live = self._attention_load()
        return {r: a for r, a in sorted(self.attention_addresses.items()) if r in live}

    async def report_attention(self, replica_id: str, load: dict, address: str | None = None) -> None:
        """An attention replica's demand (sequences, KV usage), placement version and step times,
        sent with each table refresh, and the address of its channel while it takes requests (a
        restarted router learns it again)."""
        self.attention[replica_id] = (time.monotonic(), load)
        if address and replica_id not in self.attention_draining:
            self.attention_addresses[replica_id] = address
        last = self.rebalancer.last if self.rebalancer else None
        if last and last.get("changed") and not last.get("switched"):
            # a rebalance under way: the longest engine step any attention replica took meanwhile
            last["longest_step_s"] = max(last.get("longest_step_s") or 0.0, load.get("step_max_s") or 0.0)
            versions = self._attention_versions()
            if last["state"] == "published" and versions and min(versions) >= last["version"]:
                last["switched"] = True  # every live attention replica moved: old copies can go
            elif last["state"] == "abandoned":
                last["switched"] = True  # nothing to switch to; stop watching

    def _attention_load(self) -> dict[str, dict]:
        # a silent replica (crashed, or its refresh stalled) drops out after a few refreshes' worth
        now = time.monotonic()
        self.attention = {r: (t, load) for r, (t, load) in self.attention.items() if now - t <= 3 * self.ttl_s}
        self.attention_addresses = {r: a for r, a in self.attention_addresses.items() if r in self.attention}
        return {r: load for r, (_, load) in sorted(self.attention.items()) if load}

    async def status(self) -> dict:
        snap = self.registry.snapshot()
        group_tokens = self._group_tokens()
        routed = {}
        for per_group in group_tokens.values():
            for g, n in enumerate(per_group):
                routed[str(g)] = routed.get(str(g), 0) + n
        return {"placement": self.placement, "replicas": {str(g): a for g, a in snap.replicas.items()},
                "balancedness": self._balancedness(), "routed_tokens": routed, "group_tokens": group_tokens,
                "rebalance": self.rebalancer.status() if self.rebalancer else None,
                "load": snap.load, "version": snap.version, "tokens_per_expert": self._tokens_per_expert(),
                "groups": {str(g): v for g, v in self.registry.group_load().items()},
                "replica_load": {a: {"group": r.group, "in_flight": r.in_flight, "busy_fraction": r.busy_fraction,
                                     "tokens_per_s": r.tokens_per_s} for a, r in self.registry.replicas.items()},
                "attention": self._attention_load(),
                "window_s": self.window_s, "missing_groups": [g for g, a in snap.replicas.items() if not a],
                "missing_for_s": {str(g): s for g, s in self.registry.missing_for().items()}}
