"""Redundant-expert placement: which logical experts each expert group holds, copies included.

The algorithm is the "global" form of DeepSeek's EPLB (Expert Parallelism Load Balancer,
github.com/deepseek-ai/EPLB: `rebalance_experts` without node grouping), in plain Python, plus
the rule that a group holds an expert at most once: (1) replicate: every expert gets one copy,
and each of the G*S - E spare slots goes to the expert with the largest load per copy that is
not yet in every group; (2) pack: copies, heaviest per-copy load first, go to the least loaded
group that has a free slot and does not hold that expert yet (a deterministic swap repairs the
rare dead end); (3) a short local search lowers the most loaded group while it can, by swapping
two copies between groups or by giving a slot's copy to another expert (copy counts change: this
fixes replication choices the greedy got wrong). A copy carries load[e] / copies[e], the share
of an expert's tokens that an even split over its copies gives each group (EPLB's model); a MoE
layer's step is paced by its most loaded group, so the aim is a low max group load (balancedness
near 1). Everything is deterministic: ties go to the lower expert id, then the lower group index.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass

from glm_ray.router.balance import balancedness


def group_loads(groups: Sequence[Sequence[int]], load: Sequence[float]) -> list[float]:
    """Per group: sum of load[e] / copies[e] over the experts it holds (copies counted over all groups)."""
    copies: dict[int, int] = {}
    for experts in groups:
        for e in experts:
            copies[e] = copies.get(e, 0) + 1
    return [sum(load[e] / copies[e] for e in experts) for experts in groups]


@dataclass(frozen=True)
class Plan:
    groups: list[list[int]]  # per group, the expert ids it holds, ascending, distinct within a group
    copies: list[int]  # per expert, how many groups hold it
    group_load: list[float]  # predicted, by group_loads()
    balancedness: float | None  # predicted


def _replicate(load: list[float], num_groups: int, extra: int) -> list[int]:
    """Copies per expert: one each, then each spare slot to the largest load/copies below G copies (ties: lower id)."""
    copies = [1] * len(load)
    heap = [(-w, e) for e, w in enumerate(load)]  # (-load per copy, id): pops the largest, lower id on ties
    heapq.heapify(heap)
    for _ in range(extra):  # extra <= E*(G-1), so the heap never runs dry
        _, e = heapq.heappop(heap)
        copies[e] += 1
        if copies[e] < num_groups:
            heapq.heappush(heap, (-load[e] / copies[e], e))
    return copies


def _repair(e: int, w: list[float], groups: list[set[int]], gload: list[float], free: list[int]) -> None:
    """Place a copy of `e` when every group with a free slot already holds `e`, by one swap.

    Why it always works: a copy of e is still unplaced, so e sits in at most copies[e] - 1 <= G - 1
    groups and some group h lacks it; h is full, since every group with room holds e. Take any group
    f with room: it holds e plus at most S - 2 others, while h holds S distinct experts, none of them
    e, so some y in h is not in f. Moving y from h to f and putting e in h keeps every group free of
    duplicates and uses f's free slot. Among all such (h, f, y) take the lowest resulting max(load h,
    load f), ties by (h, f, y).
    """
    best = None
    for h, held in enumerate(groups):
        if e in held:
            continue
        for f, room in enumerate(free):
            if room == 0:
                continue
            for y in sorted(held - groups[f]):
                cost = max(gload[h] - w[y] + w[e], gload[f] + w[y])
                if best is None or (cost, h, f, y) < best:
                    best = (cost, h, f, y)
    assert best is not None, "unreachable: see the argument above"
    _, h, f, y = best
    groups[h].remove(y)
    groups[h].add(e)
    groups[f].add(y)
    gload[h] += w[e] - w[y]
    gload[f] += w[y]
    free[f] -= 1


def _pack(w: list[float], copies: list[int], num_groups: int, slots: int) -> list[set[int]]:
    """Heaviest copy first, to the least loaded group with room that lacks the expert (ties: lower index)."""
    groups: list[set[int]] = [set() for _ in range(num_groups)]
    gload = [0.0] * num_groups
    free = [slots] * num_groups
    for e in sorted(range(len(w)), key=lambda x: (-w[x], x)):
        for _ in range(copies[e]):
            fits = [g for g in range(num_groups) if free[g] and e not in groups[g]]
            if not fits:
                _repair(e, w, groups, gload, free)
                continue
            g = min(fits, key=lambda x: (gload[x], x))
            groups[g].add(e)
            gload[g] += w[e]
            free[g] -= 1
    return groups


def _moves(m: int, num_experts: int, copies: list[int], groups: list[set[int]]):
    """Moves that may lower group m, in a fixed order, as (kind, g, a, b).

    ("swap", g, a, b): m hands its copy of a to group g for g's copy of b (copies unchanged).
    ("point", g, a, b): group g's slot for a now holds b (a loses a copy, b gains one); either g is
    m itself, or g is another group taking a copy of one of m's experts, so m's share of it shrinks.
    """
    for g, held in enumerate(groups):
        if g != m:
            for a in sorted(groups[m] - held):
                for b in sorted(held - groups[m]):
                    yield "swap", g, a, b
    for a in sorted(groups[m]):
        if copies[a] > 1:
            for b in range(num_experts):
                if b not in groups[m]:
                    yield "point", m, a, b
    for g, held in enumerate(groups):
        if g != m:
            for b in sorted(groups[m] - held):
                for a in sorted(held):
                    if copies[a] > 1:
                        yield "point", g, a, b


def _effect(move: tuple, m: int, load: list[float], copies: list[int], where: list[set[int]]) -> dict[int, float]:
    """{group: change of its load} for one move of _moves()."""
    kind, g, a, b = move
    if kind == "swap":
        wa, wb = load[a] / copies[a], load[b] / copies[b]
        return {m: wb - wa, g: wa - wb}
    da = load[a] / (copies[a] - 1) - load[a] / copies[a]  # each remaining copy of a carries more
    db = load[b] / (copies[b] + 1) - load[b] / copies[b]  # each old copy of b carries less
    out = {h: da for h in where[a] if h != g}
    for h in where[b]:
        out[h] = out.get(h, 0.0) + db
    out[g] = load[b] / (copies[b] + 1) - load[a] / copies[a]
    return out


def _improve(load: list[float], copies: list[int], groups: list[set[int]], rounds: int) -> None:
    """Local search: while some move of _moves() lowers the most loaded group m, apply the best one.

    A move counts only if m and every group it touches end below m's old load (the best: lowest
    such max, first in _moves() order on ties), so the loads sorted in descending order fall
    lexicographically at every step and the search ends; `rounds` caps it anyway.
    """
    where: list[set[int]] = [set() for _ in load]
    for g, held in enumerate(groups):
        for e in held:
            where[e].add(g)
    for _ in range(rounds):
        gload = [sum(load[e] / copies[e] for e in held) for held in groups]
        m = max(range(len(groups)), key=lambda g: (gload[g], -g))
        bar = gload[m] - 1e-9 * gload[m]
        best = None
        for move in _moves(m, len(load), copies, groups):
            cost = max(gload[h] + d for h, d in _effect(move, m, load, copies, where).items())
            if cost < bar and (best is None or cost < best[0]):
                best = (cost, move)
        if best is None:
            return
        kind, g, a, b = best[1]
        if kind == "swap":
            _swap_one(groups, where, m, a, b)
            _swap_one(groups, where, g, b, a)
        else:
            _swap_one(groups, where, g, a, b)
            copies[a] -= 1
            copies[b] += 1


def _swap_one(groups: list[set[int]], where: list[set[int]], g: int, out: int, into: int) -> None:
    """Group g's slot for expert `out` now holds `into`."""
    groups[g].remove(out)
    groups[g].add(into)
    where[out].discard(g)
    where[into].add(g)


class RedundantExpertPolicy:
    """Places E logical experts, with redundant copies, on G expert groups of S slots each."""

    def __init__(self, num_experts: int, num_groups: int, slots_per_group: int):
        for name, v in (("num_experts", num_experts), ("num_groups", num_groups),
                        ("slots_per_group", slots_per_group)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        total = num_groups * slots_per_group
        if not num_experts <= total <= num_experts * num_groups:
            raise ValueError(f"need num_experts <= num_groups * slots_per_group <= num_experts * num_groups, got "
                             f"num_experts={num_experts}, num_groups={num_groups}, slots_per_group={slots_per_group} "
                             f"({total} slots)")
        self.num_experts = num_experts
        self.num_groups = num_groups
        self.slots_per_group = slots_per_group

    def _check(self, load: Sequence[float]) -> list[float]:
        if len(load) != self.num_experts:
            raise ValueError(f"load has {len(load)} entries, expected one per expert ({self.num_experts})")
        out = []
        for e, v in enumerate(load):
            v = float(v)
            if not math.isfinite(v) or v < 0:
                raise ValueError(f"load[{e}] must be finite and >= 0, got {v!r}")
            out.append(v)
        return out

    def place(self, load: Sequence[float]) -> Plan:
        """The placement for per-expert `load` (tokens, or any non-negative measure); fills every slot."""
        load = self._check(load)
        g, s = self.num_groups, self.slots_per_group
        copies = _replicate(load, g, g * s - self.num_experts)
        w = [x / c for x, c in zip(load, copies)]
        groups = _pack(w, copies, g, s)
        _improve(load, copies, groups, rounds=4 * g * s)
        out = [sorted(held) for held in groups]
        loads = group_loads(out, load)
        return Plan(groups=out, copies=copies, group_load=loads, balancedness=balancedness(loads))
