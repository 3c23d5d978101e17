"""Which expert group holds each routed expert, and at which slot.

A group holds its experts in ascending id order, the order `load_weights(expert_ids=...)` stacks
them in, so an expert's slot is its rank within its group and never needs to be sent separately.
Every expert lives in exactly one group (no redundant copies yet). `version` lets replicas and
callers tell a stale table from the current one.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch


class Placement:
    def __init__(self, groups: Sequence[Iterable[int]], version: int = 0):
        if version < 0:
            raise ValueError(f"placement version must be >= 0, got {version}")
        groups = [sorted(int(e) for e in g) for g in groups]
        if not groups:
            raise ValueError("a placement needs at least one expert group")
        empty = [g for g, ids in enumerate(groups) if not ids]
        if empty:
            raise ValueError(f"expert groups {empty} hold no experts; every group must hold at least one")
        num_experts = sum(len(ids) for ids in groups)
        group_of = torch.full((num_experts,), -1, dtype=torch.long)
        slot_of = torch.full((num_experts,), -1, dtype=torch.long)
        for g, ids in enumerate(groups):
            for slot, e in enumerate(ids):
                if not 0 <= e < num_experts:
                    raise ValueError(f"expert {e} in group {g} is out of range: {num_experts} experts in all "
                                     f"means ids 0..{num_experts - 1}")
                if group_of[e] >= 0:
                    where = "twice in group" if group_of[e] == g else f"in groups {int(group_of[e])} and"
                    raise ValueError(f"expert {e} is placed {where} {g}; each expert must be in exactly one group")
                group_of[e], slot_of[e] = g, slot
        # no gaps: num_experts distinct ids in 0..num_experts-1 cover the range
        self.groups: tuple[tuple[int, ...], ...] = tuple(tuple(ids) for ids in groups)
        self.version = int(version)
        self.num_experts = num_experts
        self.group_of = group_of  # [E] expert -> group
        self.slot_of = slot_of  # [E] expert -> slot within its group

    @classmethod
    def contiguous(cls, num_experts: int, num_groups: int, version: int = 0) -> Placement:
        """Groups of consecutive ids; when num_groups does not divide num_experts the first
        groups hold one expert more."""
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        if not 1 <= num_groups <= num_experts:
            raise ValueError(f"num_groups must be between 1 and num_experts ({num_experts}), got {num_groups}")
        base, extra = divmod(num_experts, num_groups)
        groups, start = [], 0
        for g in range(num_groups):
            size = base + (1 if g < extra else 0)
            groups.append(range(start, start + size))
            start += size
        return cls(groups, version)

    @property
    def num_groups(self) -> int:
        return len(self.groups)

    def experts_of(self, group: int) -> list[int]:
        """Global expert ids held by `group`, in slot order."""
        if not 0 <= group < self.num_groups:
            raise ValueError(f"group {group} out of range 0..{self.num_groups - 1}")
        return list(self.groups[group])

    def to_dict(self) -> dict:
        """Plain ints and lists: msgpack- and JSON-able."""
        return {"version": self.version, "groups": [list(ids) for ids in self.groups]}

    @classmethod
    def from_dict(cls, d: dict) -> Placement:
        try:
            return cls(d["groups"], int(d.get("version", 0)))
        except (KeyError, TypeError) as e:
            raise ValueError(f"not a placement dict (want {{'version': int, 'groups': [[int]]}}): {e!r}") from None

    def __eq__(self, other) -> bool:
        return isinstance(other, Placement) and (self.groups, self.version) == (other.groups, other.version)

    def __hash__(self) -> int:
        return hash((self.groups, self.version))

    def __repr__(self) -> str:
        sizes = [len(ids) for ids in self.groups]
        return f"Placement(num_experts={self.num_experts}, group_sizes={sizes}, version={self.version})"
