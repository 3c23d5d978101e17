"""Which expert groups hold each routed expert, and at which slot.

A group holds its experts in ascending id order, the order `load_weights(expert_ids=...)` stacks
them in, so an expert's slot is its rank within its group and never needs to be sent separately.
An expert may be held by several groups (redundant copies, issue 20: a hot expert's tokens are
then spread over its copies, `spread`), at most once per group; every expert is held at least
once. `version` tells a stale table from the current one: a rebalance publishes a new version.
Legend: E experts, G groups, T tokens, K top-k.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch


class Placement:
    def __init__(self, groups: Sequence[Iterable[int]], version: int = 0, num_experts: int | None = None):
        if version < 0:
            raise ValueError(f"placement version must be >= 0, got {version}")
        groups = [sorted(int(e) for e in g) for g in groups]
        if not groups:
            raise ValueError("a placement needs at least one expert group")
        empty = [g for g, ids in enumerate(groups) if not ids]
        if empty:
            raise ValueError(f"expert groups {empty} hold no experts; every group must hold at least one")
        if num_experts is None:
            num_experts = len({e for ids in groups for e in ids})
        slot_in = torch.full((num_experts, len(groups)), -1, dtype=torch.long)  # [E, G]
        for g, ids in enumerate(groups):
            for slot, e in enumerate(ids):
                if not 0 <= e < num_experts:
                    raise ValueError(f"expert {e} in group {g} is out of range: {num_experts} experts in all "
                                     f"means ids 0..{num_experts - 1}")
                if slot_in[e, g] >= 0:
                    raise ValueError(f"expert {e} is placed twice in group {g}; a group holds an expert at most once")
                slot_in[e, g] = slot
        copies = (slot_in >= 0).sum(dim=1)  # [E]
        missing = torch.nonzero(copies == 0).flatten().tolist()
        if missing:
            raise ValueError(f"experts {missing[:10]}{' ...' if len(missing) > 10 else ''} are in no group; "
                             f"every one of the {num_experts} experts must be held by at least one group")
        self.groups: tuple[tuple[int, ...], ...] = tuple(tuple(ids) for ids in groups)
        self.version = int(version)
        self.num_experts = num_experts
        self.slot_in = slot_in  # [E, G] slot of expert e in group g, -1 where g does not hold it
        self.copies = copies  # [E] groups holding each expert
        # the first group holding each expert, and the slot there: the whole table when nothing is copied
        self.group_of = torch.argmax((slot_in >= 0).int(), dim=1)  # [E]
        self.slot_of = slot_in.gather(1, self.group_of[:, None]).squeeze(1)  # [E]

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

    @property
    def redundant(self) -> bool:
        """Whether any expert has more than one copy."""
        return bool((self.copies > 1).any())

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
        return (f"Placement(num_experts={self.num_experts}, group_sizes={sizes}, "
                f"copies={int(self.copies.sum())}, version={self.version})")


class Spreader:
    """Sends each (token, expert) pair of a batch to one group holding the expert. An expert with
    one copy has no choice; the pairs of a copied expert are shared among its copies so as to even
    out the groups' pair counts for this batch: each copied expert's pairs are water-filled over its
    holders, on top of what the single-copy experts put there (experts with the fewest holders
    first, then the hottest), then each is filled again against the others' final split (within one
    pair of the best split on the cases tests/unit/test_placement.py solves). Deterministic: the same batch and
    table give the same split, and pairs go to copies in token order. numpy, on the caller's thread.
    """

    def __init__(self, placement: Placement):
        self.num_groups = placement.num_groups
        self.group_of = placement.group_of.numpy()  # [E]
        self.slot_of = placement.slot_of.numpy()  # [E]
        self.slot_in = placement.slot_in.numpy()  # [E, G]
        self.copied = placement.copies.numpy() > 1  # [E]
        self.any_copied = bool(self.copied.any())
        self.holders = [np.flatnonzero(row >= 0) for row in self.slot_in]  # per expert, its groups ascending

    def __call__(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """ids [T, K] global expert ids -> (group [T, K], slot within that group [T, K])."""
        group, slot = self.group_of[ids], self.slot_of[ids]
        if not self.any_copied:
            return group, slot
        flat = ids.reshape(-1)
        copied = self.copied[flat]
        if not copied.any():
            return group, slot
        group, slot = group.reshape(-1).copy(), slot.reshape(-1).copy()
        load = np.bincount(group[~copied], minlength=self.num_groups).astype(np.float64)  # [G]
        experts, counts = np.unique(flat[copied], return_counts=True)
        for e, share in self._split(experts, counts, load, water_fill).items():
            pairs = np.flatnonzero(flat == e)  # in token order
            to = np.repeat(self.holders[e], share)
            group[pairs], slot[pairs] = to, self.slot_in[e, to]
        return group.reshape(ids.shape), slot.reshape(ids.shape)

    def group_loads(self, per_expert) -> list[float]:
        """Per group, the load of `per_expert` (tokens per expert) once split as batches are, in
        fractions: what the router predicts a placement's balancedness with."""
        per_expert = np.asarray(per_expert, dtype=np.float64)
        single = ~self.copied
        load = np.bincount(self.group_of[single], weights=per_expert[single], minlength=self.num_groups)
        experts = np.flatnonzero(self.copied & (per_expert > 0))
        for e, share in self._split(experts, per_expert[experts], load, water_level).items():
            load[self.holders[e]] += share
        return load.tolist()

    def _split(self, experts: np.ndarray, counts: np.ndarray, load: np.ndarray, fill) -> dict[int, np.ndarray]:
        """{expert: its share per holder}: `counts` of each copied expert filled over its holders on
        top of `load` (fewest holders first, then the hottest, then by id), then each filled again
        against the others' final split. `load` is left as it was."""
        load = load.copy()
        copies = np.array([len(self.holders[e]) for e in experts])
        order = np.lexsort((experts, -counts, copies))
        shares = {}
        for i in order:
            e = int(experts[i])
            shares[e] = fill(load[self.holders[e]], counts[i])
            load[self.holders[e]] += shares[e]
        for i in order:  # one more pass: each expert re-split against what the others ended with
            e = int(experts[i])
            load[self.holders[e]] -= shares[e]
            shares[e] = fill(load[self.holders[e]], counts[i])
            load[self.holders[e]] += shares[e]
        return shares


def water_level(load: np.ndarray, amount: float) -> np.ndarray:
    """`amount` poured over bins that already hold `load`: each bin's share, so that the fullest bin
    ends as low as it can (the emptiest bins rise to one level)."""
    order = np.argsort(load, kind="stable")
    sorted_load = load[order].astype(np.float64)
    k = 1
    # raise the water over the k emptiest bins until the next bin is above it
    while k < len(load) and (sorted_load[:k].sum() + amount) / k > sorted_load[k]:
        k += 1
    level = (sorted_load[:k].sum() + amount) / k
    out = np.zeros(len(load), dtype=np.float64)
    out[order[:k]] = level - sorted_load[:k]
    return out


def water_fill(load: np.ndarray, n: int) -> np.ndarray:
    """`water_level` in whole items: integers summing to n, what flooring leaves over going to the
    emptiest bins (ties by position)."""
    n = int(n)
    share = water_level(load, n)
    take = np.floor(share + 1e-9).astype(np.int64)
    order = np.argsort(load, kind="stable")
    for j in range(n - int(take.sum())):
        take[order[j % int((share > 0).sum() or 1)]] += 1
    return take
