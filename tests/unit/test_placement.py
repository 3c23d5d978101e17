"""The expert -> (group, slot) table: every expert exactly once, slots in loader order."""

import msgpack
import pytest
import torch

from glm_ray.router.placement import Placement


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
    ([[0, 1], [1, 2]], "expert 1 is placed in groups 0 and 1"),
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
