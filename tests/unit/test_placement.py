"""The expert -> (group, slot) table: every expert at least once, at most once a group, slots in loader order;
the split of a batch over copied experts."""

import itertools

import msgpack
import numpy as np
import pytest
import torch

from glm_ray.router.placement import Placement, Spreader, water_fill


@pytest.mark.parametrize("num_experts, num_groups", [(8, 1), (8, 2), (8, 3), (7, 7), (160, 6), (5, 4), (1, 1)])
def test_contiguous_covers_every_expert_once(num_experts, num_groups):
    p = Placement.contiguous(num_experts, num_groups)
    assert p.num_groups == num_groups and p.num_experts == num_experts
    groups = [p.experts_of(g) for g in range(num_groups)]
    assert sum(groups, []) == list(range(num_experts))  # contiguous, in order
    sizes = [len(ids) for ids in groups]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
    for g, ids in enumerate(groups):
        assert p.group_of[ids].tolist() == [g] * len(ids)
        assert p.slot_of[ids].tolist() == list(range(len(ids)))
    assert p.group_of.dtype == p.slot_of.dtype == torch.long


@pytest.mark.parametrize("num_experts, num_groups", [(8, 0), (8, 9), (8, -1), (0, 1)])
def test_contiguous_rejects_impossible_group_counts(num_experts, num_groups):
    with pytest.raises(ValueError, match="num_groups|num_experts"):
        Placement.contiguous(num_experts, num_groups)


def test_general_groups_are_held_in_ascending_order():
    p = Placement([[5, 0, 3], [1, 4, 2]], version=3)
    assert p.experts_of(0) == [0, 3, 5] and p.experts_of(1) == [1, 2, 4]
    assert p.group_of.tolist() == [0, 1, 1, 0, 1, 0]
    assert p.slot_of.tolist() == [0, 0, 1, 1, 2, 2]
    assert p.version == 3


@pytest.mark.parametrize("groups, message", [
    ([[0, 0, 1]], "expert 0 is placed twice in group 0"),
    ([[0, 1], [3]], "expert 3 in group 1 is out of range"),
    ([[0, 1], []], r"groups \[1\] hold no experts"),
    ([], "at least one expert group"),
    ([[-1, 0]], "expert -1 in group 0 is out of range"),
])
def test_invalid_placements_say_what_is_wrong(groups, message):
    with pytest.raises(ValueError, match=message):
        Placement(groups)


def test_experts_of_rejects_unknown_group():
    with pytest.raises(ValueError, match="group 2 out of range 0..1"):
        Placement.contiguous(4, 2).experts_of(2)


def test_dict_round_trip_through_msgpack():
    p = Placement([[2, 0], [1, 3, 4]], version=7)
    back = Placement.from_dict(msgpack.unpackb(msgpack.packb(p.to_dict())))
    assert back == p and back.version == 7 and torch.equal(back.slot_of, p.slot_of)
    assert back != Placement([[2, 0], [1, 3, 4]], version=8)
    with pytest.raises(ValueError, match="not a placement dict"):
        Placement.from_dict({"version": 1})


def test_invalid_placement_names_experts_in_no_group():
    with pytest.raises(ValueError, match=r"experts \[2\] are in no group"):
        Placement([[0, 1], [1]], num_experts=3)


def test_an_expert_may_be_copied_into_several_groups():
    p = Placement([[0, 1, 2], [1, 3, 2]], version=2)
    assert p.redundant and p.copies.tolist() == [1, 2, 2, 1]
    assert p.slot_in.tolist() == [[0, -1], [1, 0], [2, 1], [-1, 2]]
    assert p.group_of.tolist() == [0, 0, 0, 1] and p.slot_of.tolist() == [0, 1, 2, 2]  # first copy
    assert not Placement.contiguous(8, 2).redundant


def test_without_copies_the_split_is_the_table():
    p = Placement.contiguous(8, 3)
    ids = np.random.default_rng(0).integers(0, 8, size=(16, 4))
    group, slot = Spreader(p)(ids)
    assert (group == p.group_of.numpy()[ids]).all() and (slot == p.slot_of.numpy()[ids]).all()


@pytest.mark.parametrize("seed", range(20))
def test_copied_experts_even_out_the_groups(seed):
    rng = np.random.default_rng(seed)
    # 8 experts over 3 groups; experts 0 and 1 are hot and held by every group, 2 by two groups
    p = Placement([[0, 1, 2, 3, 4], [0, 1, 2, 5, 6], [0, 1, 7]])
    t, k = int(rng.integers(1, 24)), 3
    ids = np.stack([rng.choice(8, size=k, replace=False, p=[.3, .3, .1, .06, .06, .06, .06, .06]) for _ in range(t)])
    group, slot = Spreader(p)(ids)
    # every pair goes to a group that holds its expert, at the slot it holds it in
    assert (p.slot_in.numpy()[ids, group] == slot).all() and (slot >= 0).all()
    load = np.bincount(group.reshape(-1), minlength=3)
    # no split of the copied experts' pairs over their holders gives a lower maximum (brute force)
    fixed = np.bincount(group.reshape(-1)[p.copies.numpy()[ids.reshape(-1)] == 1], minlength=3)
    n0, n1, n2 = (int((ids == e).sum()) for e in (0, 1, 2))
    best = min(max(fixed[0] + a0 + a1 + c, fixed[1] + b0 + b1 + (n2 - c), fixed[2] + (n0 - a0 - b0) + (n1 - a1 - b1))
               for a0 in range(n0 + 1) for b0 in range(n0 - a0 + 1) for a1 in range(n1 + 1)
               for b1 in range(n1 - a1 + 1) for c in range(n2 + 1))
    assert load.max() <= best + 1, (load, best)  # greedy by expert: within one pair of the optimum
    again, _ = Spreader(p)(ids)
    assert (again == group).all()  # deterministic


def test_a_token_can_reach_a_copied_expert_in_another_group_than_its_other_experts():
    p = Placement([[0, 1], [1, 2]])
    ids = np.array([[1, 0]] * 4 + [[1, 2]] * 4)
    group, _ = Spreader(p)(ids)
    assert np.bincount(group.reshape(-1)).tolist() == [8, 8]  # expert 1's 8 pairs fill both groups up to 8


@pytest.mark.parametrize("load, n", [([0, 0], 5), ([3, 0, 1], 4), ([5], 3), ([2, 2, 9], 7), ([0.5, 0], 1), ([1, 4], 0)])
def test_water_fill_lowers_the_top_as_far_as_integers_allow(load, n):
    load = np.array(load, dtype=float)
    take = water_fill(load, n)
    assert take.sum() == n and (take >= 0).all()
    best = min(max(load + np.array(split)) for split in itertools.product(range(n + 1), repeat=len(load))
               if sum(split) == n)
    assert max(load + take) == best
