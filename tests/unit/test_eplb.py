"""Redundant-expert placement (global EPLB): every plan is valid, close to the brute-force optimum,
splits hot experts over groups, and rejects bad inputs."""

import itertools
import math
import random

import pytest

import glm_ray.router.eplb as eplb
from glm_ray.router.balance import balancedness
from glm_ray.router.eplb import Plan, RedundantExpertPolicy, group_loads


def check_valid(plan: Plan, load, num_experts: int, num_groups: int, slots: int) -> None:
    assert len(plan.groups) == num_groups
    for held in plan.groups:
        assert len(held) == slots  # every slot filled
        assert held == sorted(set(held))  # ascending, an expert at most once per group
        assert all(0 <= e < num_experts for e in held)
    copies = [sum(e in held for held in plan.groups) for e in range(num_experts)]
    assert plan.copies == copies and min(copies) >= 1  # every expert held somewhere
    assert plan.group_load == pytest.approx(group_loads(plan.groups, load))
    assert sum(plan.group_load) == pytest.approx(sum(load))  # the split conserves load
    b = balancedness(plan.group_load)
    assert (plan.balancedness is None) == (b is None)
    if b is not None:
        assert plan.balancedness == pytest.approx(b)


def random_load(rng: random.Random, num_experts: int, kind: str) -> list[float]:
    if kind == "uniform":
        return [rng.uniform(0, 10) for _ in range(num_experts)]
    if kind == "hot":  # heavy tail: one or two experts take most tokens
        load = [rng.uniform(0, 1) for _ in range(num_experts)]
        for e in rng.sample(range(num_experts), min(num_experts, rng.choice([1, 2]))):
            load[e] = rng.uniform(5, 50)
        return load
    if kind == "zeros":  # many idle experts, sometimes all
        return [rng.choice([0.0, 0.0, rng.uniform(0, 10)]) for _ in range(num_experts)]
    return [float(rng.randint(0, 5)) for _ in range(num_experts)]  # "ints": many exact ties


KINDS = ("uniform", "hot", "zeros", "ints")


def test_group_loads_split_an_experts_load_evenly_over_its_copies():
    assert group_loads([[0, 1], [1, 2]], [4, 2, 3]) == [5.0, 4.0]  # expert 1 is held twice: 1 each
    assert group_loads([[0], [1]], [0, 0]) == [0.0, 0.0]
    assert balancedness([5, 5]) == 1.0 and balancedness([8, 0, 0, 0]) == pytest.approx(0.25)
    assert balancedness([]) is None and balancedness([0, 0]) is None


def test_every_plan_is_valid_on_random_cases():
    rng = random.Random(1234)
    for _ in range(400):
        g = rng.randint(1, 6)
        e = rng.randint(1, 24)
        s = rng.randint(-(-e // g), e)  # ceil(E/G) <= S <= E: the valid range
        load = random_load(rng, e, rng.choice(KINDS))
        plan = RedundantExpertPolicy(e, g, s).place(load)
        check_valid(plan, load, e, g, s)
        assert RedundantExpertPolicy(e, g, s).place(load) == plan  # deterministic


def test_packing_repairs_dead_ends_for_any_copy_counts(monkeypatch):
    """When every group with a free slot already holds the expert, _pack swaps one copy out (see
    _repair for why that always works). EPLB's own copy counts seem never to reach that dead end,
    so feed _pack arbitrary valid copy counts: the repair must run, and every result be valid."""
    repairs = []
    real = eplb._repair
    monkeypatch.setattr(eplb, "_repair", lambda *a: (repairs.append(1), real(*a)))
    rng = random.Random(7)
    for _ in range(1500):
        g, e = rng.randint(2, 5), rng.randint(2, 10)
        s = rng.randint(-(-e // g), e)
        copies = [1] * e
        for _ in range(g * s - e):
            copies[rng.choice([x for x in range(e) if copies[x] < g])] += 1
        w = [float(rng.choice([0, 1, 2, 5, 20])) for _ in range(e)]
        groups = eplb._pack(w, copies, g, s)
        assert all(len(held) == s for held in groups)
        assert [sum(x in held for held in groups) for x in range(e)] == copies
    assert len(repairs) > 50  # the dead end is common here (185 repairs in these 1500 runs, measured)


def small_configs():
    for e in range(3, 7):
        for g in (2, 3):
            for s in range(1, e + 1):
                if e <= g * s <= min(e * g, 8):
                    yield e, g, s


def optimum(e: int, g: int, s: int, load) -> float:
    """Lowest max group load over every valid placement (groups are interchangeable)."""
    best = math.inf
    for pick in itertools.combinations_with_replacement(itertools.combinations(range(e), s), g):
        if len(set().union(*pick)) == e:
            best = min(best, max(group_loads(pick, load)))
    return best


def test_close_to_the_brute_force_optimum_on_small_cases():
    # Measured with this load mix over the same 14 configurations, 1,000 loads of each kind per
    # configuration (56,000 cases, seed 2024): optimal in 51,707 (92.3%), worst ratio 9/7 = 1.286
    # (E=4, G=3, S=2, load [4, 4, 4, 2]: a local optimum two moves away from the best). Plain EPLB
    # (replicate + pack, no local search) on the same cases: 43,117 optimal (77.0%), worst 5/3.
    # This seeded subset: 1,120 cases, optimal in 1,045 (93.3%), worst ratio 1.25.
    rng = random.Random(0)
    cases = optimal = 0
    worst = 1.0
    for e, g, s in small_configs():
        policy = RedundantExpertPolicy(e, g, s)
        for kind in KINDS:
            for _ in range(20):
                load = random_load(rng, e, kind)
                plan = policy.place(load)
                check_valid(plan, load, e, g, s)
                best, got = optimum(e, g, s, load), max(plan.group_load)
                cases += 1
                if got <= best * (1 + 1e-9):
                    optimal += 1
                else:
                    worst = max(worst, got / best)
    assert cases == 1120
    assert worst <= 4 / 3
    assert optimal / cases >= 0.88


def test_local_search_fixes_a_replication_choice_greedy_eplb_gets_wrong(monkeypatch):
    # Greedy replication gives both spare slots to expert 0 (4 -> 2 -> 4/3 per copy), so expert 1
    # (load 2) shares a group with a copy of 0: max 10/3. Two copies each of 0 and of idle 2 give 2.
    plan = RedundantExpertPolicy(4, 3, 2).place([4, 2, 0, 0])
    assert max(plan.group_load) == pytest.approx(2.0) and plan.balancedness == pytest.approx(1.0)
    monkeypatch.setattr(eplb, "_improve", lambda *a, **k: None)
    greedy = RedundantExpertPolicy(4, 3, 2).place([4, 2, 0, 0])
    assert greedy.copies == [3, 1, 1, 1] and max(greedy.group_load) == pytest.approx(10 / 3)


def test_hot_experts_get_a_copy_in_both_groups():
    load = [100, 90, 1, 1, 1, 1, 1, 1]
    plan = RedundantExpertPolicy(8, 2, 5).place(load)
    check_valid(plan, load, 8, 2, 5)
    assert plan.copies[:2] == [2, 2] and all(0 in held and 1 in held for held in plan.groups)
    assert plan.balancedness >= 0.95  # 1.0 measured: 98 and 98
    contiguous = balancedness(group_loads([[0, 1, 2, 3], [4, 5, 6, 7]], load))
    assert contiguous == pytest.approx(98 / 192)  # 192 vs 4 tokens: about 0.51


def test_without_spare_slots_it_still_balances_and_never_loses_to_contiguous():
    load = [100, 90, 1, 1, 1, 1, 1, 1]
    plan = RedundantExpertPolicy(8, 2, 4).place(load)
    check_valid(plan, load, 8, 2, 4)
    assert plan.copies == [1] * 8
    assert max(plan.group_load) == 100 + 3  # the hot pair is split; 90 takes the three others
    assert plan.balancedness == pytest.approx(98 / 103)
    assert balancedness(group_loads([[0, 1, 2, 3], [4, 5, 6, 7]], load)) == pytest.approx(98 / 192)
    rng = random.Random(99)
    for _ in range(300):
        g, s = rng.randint(1, 6), rng.randint(1, 8)
        load = random_load(rng, g * s, rng.choice(KINDS))
        rng.shuffle(load)
        plan = RedundantExpertPolicy(g * s, g, s).place(load)
        assert plan.copies == [1] * (g * s)
        contiguous = group_loads([range(i * s, (i + 1) * s) for i in range(g)], load)
        assert max(plan.group_load) <= max(contiguous) * (1 + 1e-9)


def test_all_zero_load_still_fills_every_slot_by_expert_id():
    plan = RedundantExpertPolicy(4, 3, 2).place([0, 0, 0, 0])
    check_valid(plan, [0, 0, 0, 0], 4, 3, 2)
    assert plan.balancedness is None and plan.group_load == [0.0, 0.0, 0.0]
    assert plan.copies == [3, 1, 1, 1]  # spare slots go to the lowest ids first
    assert RedundantExpertPolicy(4, 3, 2).place([0.0] * 4) == plan


@pytest.mark.parametrize("args, bad", [
    ((0, 2, 4), "num_experts"), ((8, 0, 4), "num_groups"), ((8, 2, 0), "slots_per_group"),
    ((8, 2, 2.5), "slots_per_group"), ((8, 2, 3), "num_experts=8"), ((2, 3, 3), "9 slots"),
])
def test_bad_shapes_are_refused(args, bad):
    with pytest.raises(ValueError, match=bad):
        RedundantExpertPolicy(*args)


@pytest.mark.parametrize("load, bad", [
    ([1, 2, 3], "3 entries"), ([1, 2, 3, 4, 5], "5 entries"), ([1, -2, 3, 4], r"load\[1\].*-2"),
    ([1, 2, math.nan, 4], r"load\[2\].*nan"), ([math.inf, 2, 3, 4], r"load\[0\].*inf"),
])
def test_bad_loads_are_refused(load, bad):
    with pytest.raises(ValueError, match=bad):
        RedundantExpertPolicy(4, 2, 2).place(load)
