"""Replica choice within an expert group, without Ray or gRPC."""

import random
from collections import Counter

import pytest

from glm_ray.experts.policy import LeastOutstanding, PowerOfTwoChoices

REPLICAS = ["a:1", "b:2", "c:3"]


def policies():
    return [LeastOutstanding(), PowerOfTwoChoices(random.Random(0))]


@pytest.mark.parametrize("policy", policies(), ids=["least", "p2c"])
def test_nothing_left_gives_none(policy):
    assert policy.choose([], {}, set()) is None
    assert policy.choose(REPLICAS, {}, set(REPLICAS)) is None


@pytest.mark.parametrize("policy", policies(), ids=["least", "p2c"])
def test_excluded_replicas_are_never_chosen(policy):
    picks = {policy.choose(REPLICAS, {}, {"a:1"}) for _ in range(50)}
    assert picks == {"b:2", "c:3"}
    assert policy.choose(REPLICAS, {"c:3": 9}, {"a:1", "b:2"}) == "c:3"  # the only one left, loaded or not


@pytest.mark.parametrize("policy", policies(), ids=["least", "p2c"])
def test_the_busiest_replica_is_avoided(policy):
    outstanding = {"a:1": 4, "b:2": 1, "c:3": 1}
    assert "a:1" not in {policy.choose(REPLICAS, outstanding, set()) for _ in range(50)}


def test_least_outstanding_takes_the_minimum_and_rotates_ties():
    policy = LeastOutstanding()
    assert policy.choose(REPLICAS, {"a:1": 2, "b:2": 0, "c:3": 1}, set()) == "b:2"
    counts = Counter(policy.choose(REPLICAS, {}, set()) for _ in range(30))
    assert counts == {"a:1": 10, "b:2": 10, "c:3": 10}


def test_least_outstanding_rotates_each_replica_list_on_its_own():
    """One policy shared by two groups called alternately still spreads each group's calls."""
    policy, other = LeastOutstanding(), ["x:1", "y:2"]
    picks = []
    for _ in range(6):
        picks.append(policy.choose(REPLICAS[:2], {}, set()))
        policy.choose(other, {}, set())
    assert Counter(picks) == {"a:1": 3, "b:2": 3}


def test_power_of_two_is_reproducible_and_spreads_equal_load():
    p, q = PowerOfTwoChoices(random.Random(7)), PowerOfTwoChoices(random.Random(7))
    assert [p.choose(REPLICAS, {}, set()) for _ in range(20)] == [q.choose(REPLICAS, {}, set()) for _ in range(20)]
    counts = Counter(p.choose(REPLICAS, {}, set()) for _ in range(300))
    assert set(counts) == set(REPLICAS) and min(counts.values()) > 50
