"""The rebalancing state machine (router/rebalance.py): a version is proposed from the routing
window, built by every replica, published only when all hold it, retired when no attention replica
uses the old one; failures and timeouts leave the version in force."""

import pytest

from glm_ray.router.placement import Placement
from glm_ray.router.rebalance import Rebalancer, RebalanceRefused

# 8 experts, 2 groups of 4; experts 0 and 1 take most tokens, and both are in group 0
SKEWED = {"1": [100, 90, 5, 5, 5, 5, 5, 5], "2": [80, 100, 5, 5, 5, 5, 5, 5]}


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def live(*groups):
    return {g: list(addresses) for g, addresses in enumerate(groups)}


def test_a_proposal_copies_the_hot_experts_and_predicts_the_gain():
    r = Rebalancer(Placement.contiguous(8, 2), redundant_experts=2, clock=Clock())
    assert r.slots_per_group == 6
    record = r.propose(SKEWED, "test")
    assert record["changed"] and record["state"] == "loading" and record["version"] == 1
    assert record["predicted_before"]["min"] == pytest.approx(110 / 200)  # layer 1: group 0 has 200 of 220
    assert record["predicted_after"]["min"] > 0.95 > record["predicted_before"]["min"]
    assert record["copies"] == 12 and r.pending.copies[:2].tolist() == [2, 2]
    assert {0, 1} <= set(record["moves"]["1"]["gains"])  # group 1 gains copies of both hot experts
    assert r.current.version == 0  # nothing in force changed yet
    with pytest.raises(RebalanceRefused, match="version 1 is still being loaded"):
        r.propose(SKEWED, "again")


def test_published_only_once_every_live_replica_of_every_group_holds_it():
    r = Rebalancer(Placement.contiguous(8, 2), redundant_experts=2, clock=Clock())
    r.propose(SKEWED, "test")
    assert r.target(1) == {"version": 1, "expert_ids": r.pending.experts_of(1)}
    assert r.in_force(1) == {"version": 0, "expert_ids": [4, 5, 6, 7]}
    for address in ("a0", "b0", "a1"):
        r.report(address, [0])
    r.report("a0", [0, 1])
    r.report("a1", [0, 1])
    assert not r.try_publish(live(["a0", "b0"], ["a1"]))  # b0 is still loading
    assert not r.try_publish(live(["a0"], []))  # group 1 has no live replica: wait for one
    assert not r.try_publish(live(["a0"], ["a1"]))  # a1 is back, but what it holds is known again only ...
    r.report("a1", [0, 1])  # ... from its next sync (replicas that vanish are forgotten)
    assert r.try_publish(live(["a0"], ["a1"]))  # b0 left: every live replica holds it
    assert r.current.version == 1 and r.pending is None and r.rebalances == 1
    assert r.last["state"] == "published" and r.last["seconds"] is not None
    # the old version stays while an attention replica still steps with it
    assert r.keep([0, 1]) == [0, 1] and r.keep([1, 1]) == [1]
    assert r.target(0)["version"] == 1  # a replica that comes now loads the version in force


def test_a_replica_failing_to_load_leaves_the_old_version_in_force():
    r = Rebalancer(Placement.contiguous(8, 2), redundant_experts=2, clock=Clock())
    r.propose(SKEWED, "test")
    r.report("a0", [0], {"version": 1, "error": "OSError: disk full"})
    assert r.pending is None and r.current.version == 0 and r.failures == 1
    assert r.last["state"] == "abandoned" and "a0 could not load it: OSError: disk full" in r.last["error"]
    assert not r.try_publish(live(["a0"], ["a1"]))
    assert r.propose(SKEWED, "retry")["version"] == 2  # a later attempt takes a fresh version number


def test_a_rebalance_not_loaded_in_time_is_abandoned():
    clock = Clock()
    r = Rebalancer(Placement.contiguous(8, 2), redundant_experts=2, load_timeout_s=30, clock=clock)
    r.propose(SKEWED, "test")
    r.report("a0", [0, 1])
    clock.now = 31
    assert not r.try_publish(live(["a0"], ["a1"]))
    assert r.pending is None and r.current.version == 0
    assert "replicas still loading: ['a1']" in r.last["error"]


def test_nothing_to_go_by_or_nothing_to_gain():
    r = Rebalancer(Placement.contiguous(8, 2), redundant_experts=0, clock=Clock())
    with pytest.raises(RebalanceRefused, match="no routed tokens"):
        r.propose({"1": [0] * 8}, "test")
    even = r.propose({"1": [10] * 8}, "test")
    assert not even["changed"] and even["state"] == "unchanged" and r.pending is None
    # without spare slots a rebalance still moves experts: the two hot ones end in different groups
    moved = r.propose(SKEWED, "test")
    assert moved["changed"] and r.pending.copies.tolist() == [1] * 8
    assert r.pending.group_of[0] != r.pending.group_of[1]


def test_bad_redundancy_is_refused():
    with pytest.raises(ValueError, match="redundant_experts must be >= 0, got -1"):
        Rebalancer(Placement.contiguous(8, 2), redundant_experts=-1)


def test_the_prediction_splits_copies_as_the_dispatch_does():
    from glm_ray.router.rebalance import dispatched_loads

    # expert 0 (load 10) in both groups, expert 1 (4) in group 0 only: 7 + 7, not 9 + 5 as an even split says
    assert dispatched_loads([[0, 1], [0]], [10, 4]) == pytest.approx([7, 7])
    # a copy cannot take more than what levels its group with the others
    assert dispatched_loads([[0, 1], [0, 2]], [2, 1, 9]) == pytest.approx([3, 9])
    assert dispatched_loads([[0], [1]], [3, 5]) == [3, 5]  # no copies: the loads themselves


def test_an_even_placement_is_not_moved_for_a_model_gain():
    r = Rebalancer(Placement.contiguous(8, 2), redundant_experts=2, clock=Clock())
    r.propose(SKEWED, "test")
    r.report("a0", [0, 1])
    r.report("a1", [0, 1])
    assert r.try_publish(live(["a0"], ["a1"]))
    again = r.propose(SKEWED, "again")  # the same routing: the published placement already evens it out
    assert not again["changed"] and again["predicted_before"]["min"] > 0.98 and r.pending is None
    assert r.last["state"] == "published" and r.last["version"] == 1  # the last real rebalance stays on record


def test_serve_flags_set_redundancy_and_the_threshold(capsys):
    from glm_ray.cli import build_parser, serve_config_of
    from glm_ray.serving.app import placement_for
    from glm_ray.serving.config import ServeConfig

    cfg = serve_config_of(build_parser().parse_args(["serve", "--redundant-experts", "2"]))
    assert cfg.redundant_experts == 2 and cfg.effective_rebalance_threshold() == 0.8  # on with copies
    cfg = serve_config_of(build_parser().parse_args(["serve", "--redundant-experts", "2",
                                                     "--rebalance-threshold", "0"]))
    assert cfg.effective_rebalance_threshold() == 0.0
    assert ServeConfig().effective_rebalance_threshold() == 0.0  # no copies: only on demand
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--redundant-experts", "-1"])
    assert "--redundant-experts" in capsys.readouterr().err
    with pytest.raises(ValueError, match="redundant_experts is set but expert_groups is 0"):
        placement_for(ServeConfig(expert_groups=0, redundant_experts=1), 8)


@pytest.mark.parametrize("num_groups", [3, 9])  # exhaustive, and greedy beyond 7 groups
def test_new_groups_are_numbered_to_keep_experts_where_they_are(num_groups):
    from glm_ray.router.rebalance import keep_in_place

    old = [[3 * g, 3 * g + 1, 3 * g + 2] for g in range(num_groups)]
    new = [list(group) for group in reversed(old)]  # the same groups, numbered the other way round
    new[0] = new[0][:2] + [0]  # the last old group: one expert swapped for a copy of expert 0
    renumbered = keep_in_place(old, new)
    assert sorted(map(tuple, renumbered)) == sorted(tuple(sorted(g)) for g in new)  # the same groups
    assert renumbered[:-1] == old[:-1]  # nothing moves that need not
    assert renumbered[-1] == sorted(new[0])


def test_the_router_rebalances_by_itself_below_the_threshold():
    """The router deployment's own logic (called directly, no Ray): skewed routing reported, and the
    next replica sync past the check interval starts a rebalance with the reason recorded."""
    import asyncio

    from glm_ray.serving.router import ExpertRouter

    router_cls = ExpertRouter.func_or_class
    router = router_cls(Placement.contiguous(8, 2).to_dict(), 2, ttl_s=30.0, redundant_experts=2,
                        rebalance_threshold=0.9, rebalance_interval_s=60.0)

    async def scenario():
        for g, address in enumerate(("a0", "a1")):
            await router.register(g, address, f"replica-{g}")
        await router.report_routing({"1": SKEWED["1"]})
        quiet = await router.placement_sync(0, "a0", [0])
        assert quiet["target"]["version"] == 0  # less than an interval since the last check: nothing yet
        router._last_check -= 60.0  # an interval later
        sync = await router.placement_sync(0, "a0", [0])
        status = (await router.status())["rebalance"]
        return sync, status

    sync, status = asyncio.run(scenario())
    assert sync["target"]["version"] == 1 and sync["keep"] == [0, 1]  # build version 1, keep 0 meanwhile
    assert status["pending_version"] == 1 and status["last"]["reason"].startswith("balancedness 0.550 below 0.9")


def test_a_restarted_router_goes_on_from_the_kept_placement(monkeypatch):
    from glm_ray.serving import placement_state
    from glm_ray.serving.router import ExpertRouter

    start = Placement.contiguous(8, 2).to_dict()
    kept = {"placement": {"version": 3, "groups": [[0, 1, 2, 3, 4], [0, 1, 5, 6, 7]]}, "next_version": 5}
    saved = {}
    monkeypatch.setattr(placement_state, "load", lambda key: kept if key == "k" else None)
    monkeypatch.setattr(placement_state, "save", lambda key, p, n: saved.update(key=key, placement=p, next=n))
    router = ExpertRouter.func_or_class(start, 2, 3.0, redundant_experts=1, state_key="k")
    assert router.rebalancer.current.version == 3 and router.rebalancer.next_version == 5  # 4 was proposed once
    assert router.placement["groups"] == kept["placement"]["groups"]
    fresh = ExpertRouter.func_or_class(start, 2, 3.0, redundant_experts=1, state_key="other")
    assert fresh.rebalancer.current.version == 0
    no_room = ExpertRouter.func_or_class(start, 2, 3.0, redundant_experts=0, state_key="k")  # 5 slots > 4
    assert no_room.rebalancer.current.version == 0
    router._save()
    assert saved == {"key": "k", "placement": kept["placement"], "next": 5}
    a = placement_state.state_key("/m", start, 1)
    assert a == placement_state.state_key("/m", start, 1) and a != placement_state.state_key("/m", start, 2)
    assert a != placement_state.state_key("/other", start, 1)
