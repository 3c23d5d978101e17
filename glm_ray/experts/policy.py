"""Which replica of an expert group gets the next call: small policies, one decision method each.

`replicas` are the group's current addresses, `outstanding` the calls this caller has in flight
per address (missing = 0), `exclude` addresses not to pick now (already failed this call, or
suspect). None means nothing is left to pick.
"""

from __future__ import annotations

import random
from typing import Protocol


class ReplicaPolicy(Protocol):
    def choose(self, replicas: list[str], outstanding: dict[str, int], exclude: set[str]) -> str | None: ...


def _candidates(replicas: list[str], exclude: set[str]) -> list[str]:
    return [r for r in dict.fromkeys(replicas) if r not in exclude]


class LeastOutstanding:
    """The replica with the fewest calls in flight; ties rotate (per replica list, so groups
    sharing one policy do not lock each other's turns), so a caller that never overlaps its own
    calls still spreads them over every replica."""

    def __init__(self):
        self._turns: dict[tuple[str, ...], int] = {}

    def choose(self, replicas: list[str], outstanding: dict[str, int], exclude: set[str]) -> str | None:
        candidates = _candidates(replicas, exclude)
        if not candidates:
            return None
        least = min(outstanding.get(r, 0) for r in candidates)
        tied = [r for r in candidates if outstanding.get(r, 0) == least]
        key = tuple(replicas)
        if key not in self._turns and len(self._turns) >= 1024:  # replica lists churn under autoscaling
            self._turns.clear()
        turn = self._turns[key] = self._turns.get(key, -1) + 1
        return tied[turn % len(tied)]


class PowerOfTwoChoices:
    """Two replicas drawn at random, the less loaded one wins (the first drawn on a tie): close to
    least-outstanding without every caller piling onto the same momentarily idle replica."""

    def __init__(self, rng: random.Random | None = None):
        self.rng = rng or random.Random()

    def choose(self, replicas: list[str], outstanding: dict[str, int], exclude: set[str]) -> str | None:
        candidates = _candidates(replicas, exclude)
        if len(candidates) <= 1:
            return candidates[0] if candidates else None
        a, b = self.rng.sample(candidates, 2)
        return a if outstanding.get(a, 0) <= outstanding.get(b, 0) else b
