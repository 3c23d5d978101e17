"""Live rebalancing of the expert placement: one version at a time, published only when held.

Plain Python (no Ray): the `ExpertRouter` deployment wraps it. A rebalance is proposed from the
router's routing window (tokens per expert, summed over MoE layers) by `RedundantExpertPolicy`
(eplb.py) as a new placement version. Then, without stopping anything:

1. every expert replica learns its group's slots of the pending version on its next sync (each
   heartbeat) and builds them in the background, serving the version in force meanwhile;
2. once every live replica of every group holds the pending version, it is published: attention
   replicas read it with their next table refresh and switch at the start of an engine step;
3. versions no live attention replica uses any more are retired: `keep()` tells replicas which to
   hold on to.

A replica that fails to build the pending version, or a rebalance not published within
`load_timeout_s`, abandons it: the version in force never changed, so nothing else has to. Replicas
that start mid-rebalance load the version in force, then the pending one like the others.
Legend: E experts, G groups, R redundant slots per group.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Mapping, Sequence

from glm_ray.router.balance import balancedness
from glm_ray.router.eplb import RedundantExpertPolicy
from glm_ray.router.placement import Placement, Spreader

MIN_GAIN = 0.02  # a new placement must raise the predicted balancedness (min over layers) by this much


class RebalanceRefused(ValueError):
    """A rebalance cannot start now (one is under way, or there is no routing to go by)."""


class Rebalancer:
    def __init__(self, placement: Placement, redundant_experts: int = 0, *, load_timeout_s: float = 600.0,
                 clock=time.monotonic):
        if redundant_experts < 0:
            raise ValueError(f"redundant_experts must be >= 0, got {redundant_experts}")
        e, g = placement.num_experts, placement.num_groups
        self.slots_per_group = min(e, math.ceil(e / g) + redundant_experts)
        self.policy = RedundantExpertPolicy(e, g, self.slots_per_group)
        self.redundant_experts = redundant_experts
        self.current = placement
        self.pending: Placement | None = None
        self.load_timeout_s, self.clock = load_timeout_s, clock
        self.next_version = placement.version + 1
        self.held: dict[str, set[int]] = {}  # expert replica address -> versions it holds
        self.rebalances = 0  # published
        self.failures = 0  # abandoned
        self.last: dict | None = None  # the latest rebalance: what was asked, predicted, how it ended
        self._started = 0.0

    # -- proposing -----------------------------------------------------------------------------

    def propose(self, tokens_per_expert: Mapping[str, Sequence[int]], reason: str,
                measured_before: dict | None = None) -> dict:
        """Start a rebalance from {layer: tokens per expert}; returns its record (`last` from now on).
        A plan no better than the placement in force is reported (`changed: False`), not started,
        and leaves `last` as it was."""
        if self.pending is not None:
            raise RebalanceRefused(f"placement version {self.pending.version} is still being loaded "
                                   f"({self.clock() - self._started:.0f} s so far); try again when it is published")
        layers = {str(layer): list(counts) for layer, counts in tokens_per_expert.items() if any(counts)}
        if not layers:
            raise RebalanceRefused("no routed tokens in the router's window yet: send some traffic first")
        load = [sum(counts[e] for counts in layers.values()) for e in range(self.current.num_experts)]
        plan = self.policy.place(load)
        candidate = Placement(keep_in_place(self.current.groups, plan.groups), version=self.next_version)
        before, after = predicted(layers, self.current.groups), predicted(layers, candidate.groups)
        changed = candidate.groups != self.current.groups and (after["min"] or 0) >= (before["min"] or 0) + MIN_GAIN
        record = {"reason": reason, "from_version": self.current.version,
                  "version": candidate.version if changed else self.current.version, "changed": changed,
                  "state": "loading" if changed else "unchanged",
                  "balancedness_before": measured_before or before, "predicted_before": before,
                  "predicted_after": after if changed else before,
                  "slots_per_group": self.slots_per_group, "copies": sum(len(g) for g in candidate.groups),
                  "moves": _moves(self.current, candidate) if changed else {}, "seconds": None, "error": None}
        if changed:
            self.last = record
            self.pending, self._started = candidate, self.clock()
            self.next_version += 1
        return record

    # -- expert replicas -----------------------------------------------------------------------

    def target(self, group: int) -> dict:
        """What a replica of `group` should build next: the pending version's slots, else those in force."""
        placement = self.pending or self.current
        return {"version": placement.version, "expert_ids": placement.experts_of(group)}

    def in_force(self, group: int) -> dict:
        return {"version": self.current.version, "expert_ids": self.current.experts_of(group)}

    def report(self, address: str, held_versions: Sequence[int], failure: dict | None = None) -> None:
        """An expert replica's versions held, and a failure to build one (`{"version", "error"}`)."""
        self.held[address] = {int(v) for v in held_versions}
        if failure and self.pending is not None and int(failure.get("version", -1)) == self.pending.version:
            self._abandon(f"expert replica {address} could not load it: {failure.get('error')}")

    def forget(self, address: str) -> None:
        self.held.pop(address, None)

    def keep(self, attention_versions: Sequence[int] = ()) -> list[int]:
        """Versions expert replicas must keep: in force, pending, and any a live attention replica uses."""
        out = {self.current.version, *map(int, attention_versions)}
        if self.pending is not None:
            out.add(self.pending.version)
        return sorted(out)

    # -- publishing ----------------------------------------------------------------------------

    def try_publish(self, live: Mapping[int, Sequence[str]]) -> bool:
        """Publish the pending version once every live replica of every group holds it; abandon it
        after `load_timeout_s`. live: group -> live replica addresses."""
        listed = {a for addresses in live.values() for a in addresses}
        self.held = {a: v for a, v in self.held.items() if a in listed}  # replicas that died unannounced
        if self.pending is None:
            return False
        waited = self.clock() - self._started
        version = self.pending.version
        ready = all(live.get(g) and all(version in self.held.get(a, ()) for a in live[g])
                    for g in range(self.current.num_groups))
        if ready:
            self.current, self.pending = self.pending, None
            self.rebalances += 1
            self.last.update(state="published", seconds=waited)
            return True
        if waited > self.load_timeout_s:
            groups = range(self.current.num_groups)
            loading = [a for g in groups for a in live.get(g, ()) if version not in self.held.get(a, ())]
            empty = [g for g in groups if not live.get(g)]
            self._abandon(f"not held by every replica after {self.load_timeout_s:.0f} s (replicas still loading: "
                          f"{loading or 'none'}; groups with no live replica: {empty or 'none'})")
        return False

    def _abandon(self, why: str) -> None:
        self.pending = None
        self.failures += 1
        self.last.update(state="abandoned", error=why, seconds=self.clock() - self._started)

    def status(self) -> dict:
        return {"version": self.current.version, "pending_version": self.pending.version if self.pending else None,
                "redundant_experts": self.redundant_experts, "slots_per_group": self.slots_per_group,
                "rebalances": self.rebalances, "failures": self.failures, "last": self.last}


def predicted(tokens_per_expert: Mapping[str, Sequence[int]], groups: Sequence[Sequence[int]]) -> dict:
    """Balancedness per layer with each copied expert's tokens split over its copies as attention
    replicas split them (placement.Spreader: water-filling), with min and mean over layers."""
    spread = None
    layers = {}
    for layer, counts in tokens_per_expert.items():
        spread = spread or Spreader(Placement(groups, num_experts=len(counts)))
        b = balancedness(spread.group_loads(counts))
        if b is not None:
            layers[layer] = b
    return {"layers": layers, "min": min(layers.values()) if layers else None,
            "mean": sum(layers.values()) / len(layers) if layers else None}


def dispatched_loads(groups: Sequence[Sequence[int]], load: Sequence[float]) -> list[float]:
    """Per group, its load once each copied expert's load is split over the groups holding it as
    batches are (Spreader.group_loads)."""
    return Spreader(Placement(groups, num_experts=len(load))).group_loads(load)


def keep_in_place(old: Sequence[Sequence[int]], new: Sequence[Sequence[int]]) -> list[list[int]]:
    """`new`'s groups renumbered so that as many experts as possible stay in the group that holds
    them now (groups are interchangeable to the policy): fewer experts to read during a rebalance.
    Exhaustive over the orders for up to 7 groups, greedy on overlaps beyond."""
    old_sets, new_sets = [set(g) for g in old], [set(g) for g in new]
    overlap = [[len(o & n) for n in new_sets] for o in old_sets]  # [old group][new group]
    g = len(old_sets)
    if g <= 7:
        def kept(order):  # ties: the order closest to the identity, lexicographically
            return sum(overlap[i][order[i]] for i in range(g)), [-x for x in order]
        best = max(itertools.permutations(range(g)), key=kept)
    else:
        best, free = [None] * g, set(range(g))
        for i, j in sorted(((i, j) for i in range(g) for j in range(g)), key=lambda ij: (-overlap[ij[0]][ij[1]], ij)):
            if best[i] is None and j in free:
                best[i] = j
                free.discard(j)
    return [sorted(new[best[i]]) for i in range(g)]


def _moves(old: Placement, new: Placement) -> dict[str, dict[str, list[int]]]:
    """Per group, the experts it gains and drops."""
    out = {}
    for g, (was, now) in enumerate(zip(old.groups, new.groups)):
        gains, drops = sorted(set(now) - set(was)), sorted(set(was) - set(now))
        if gains or drops:
            out[str(g)] = {"gains": gains, "drops": drops}
    return out
