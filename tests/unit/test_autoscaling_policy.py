"""Autoscaling policies of expert groups and attention replicas, on recorded traces, without a Ray cluster.

Traces go through Serve's own wrapper (`_apply_autoscaling_config`: delays, scaling factors) around the
policy Serve itself would build from our `autoscaling_config` dict, with a fake clock."""

import argparse
import importlib
from itertools import groupby
from types import SimpleNamespace

import pytest
import ray.serve.autoscaling_policy as serve_policy
from ray.serve._private.autoscaling_state import _resolve_policy_callable
from ray.serve._private.common import DeploymentID, ReplicaID
from ray.serve.config import AutoscalingConfig, AutoscalingContext
from ray.serve.schema import DeploymentSchema

from glm_ray.serving.autoscaling import (
    ATTENTION_POLICY, BUSY, EXPERT_POLICY, KV_USAGE, SEQUENCES, AttentionAutoscaling, AttentionDemandPolicy,
    ExpertAutoscaling, ExpertAutoscalingOverride, ExpertLoadPolicy, attention_replicas_wanted,
    expert_autoscaling_by_group, expert_autoscaling_for, expert_replicas_wanted, parse_replicas, replicas_arg,
    serve_autoscaling_config)

DEP = DeploymentID(name="ExpertGroup_0", app_name="default")
REPLICAS = [ReplicaID(unique_id=f"r{i}", deployment_id=DEP) for i in range(16)]


def context(cfg: AutoscalingConfig, running: int, target: int, metrics: dict, state: dict, now: float):
    return AutoscalingContext(
        deployment_id=DEP, deployment_name=DEP.name, app_name=DEP.app_name,
        current_num_replicas=running, target_num_replicas=target, running_replicas=REPLICAS[:running],
        total_num_requests=0.0, total_queued_requests=0.0, aggregated_metrics=metrics, raw_metrics={},
        capacity_adjusted_min_replicas=cfg.min_replicas, capacity_adjusted_max_replicas=cfg.max_replicas,
        policy_state=state, last_scale_up_time=None, last_scale_down_time=None, current_time=now, config=cfg)


def simulate(settings, trace, report, monkeypatch, dt: float = 1.0) -> list[int]:
    """Serve's target after each tick of `trace`. Running replicas follow the target at once;
    `report(tick, running)` gives each metric's per-replica values (None: not reported)."""
    cfg = AutoscalingConfig(**serve_autoscaling_config(settings))
    policy = serve_policy._apply_autoscaling_config(_resolve_policy_callable(cfg.policy))
    clock = SimpleNamespace(now=0.0)
    monkeypatch.setattr(serve_policy, "time", SimpleNamespace(time=lambda: clock.now))
    target, state, targets = cfg.initial_replicas, {}, []
    for i, tick in enumerate(trace):
        clock.now = 1000.0 + i * dt
        values = report(tick, target)
        metrics = {name: {r: v for r, v in zip(REPLICAS, vs) if v is not None} for name, vs in values.items()}
        decision, state = policy(context(cfg, target, target, metrics, dict(state), clock.now))
        target = max(cfg.min_replicas, min(cfg.max_replicas, decision))  # Serve's apply_bounds
        targets.append(target)
    return targets


def busy_split(load: float, running: int) -> dict:
    """`load` compute-seconds per second spread over the replicas; none is busier than 1."""
    return {BUSY: [min(1.0, load / running)] * running}


def steps(targets: list[int]) -> list[int]:
    return [t for t, _ in groupby(targets)]


# ---------------------------------------------------------------- expert groups

EXPERTS = ExpertAutoscaling(min_replicas=1, max_replicas=4, target_busy=0.6, upscale_delay_s=5,
                            downscale_delay_s=30, look_back_s=5)


def wanted(busy, target=1, **kw):
    return expert_replicas_wanted(busy, target, **{"target_busy": 0.6, "min_replicas": 1, "max_replicas": 4, **kw})


def test_expert_decision_is_ceil_of_summed_busy_over_target():
    assert wanted([0.3]) == 1
    assert wanted([0.6, 0.6]) == 2  # 1.2 / 0.6 is exactly 2, not 3 by float rounding
    assert wanted([0.7, 0.5], target=2) == 2
    assert wanted([0.3, 0.3, 0.3], target=3) == 2  # 0.9 / 0.6
    assert wanted([1.0, 1.0, 0.2], target=3) == 4
    assert wanted([0.1] * 3, target=3) == 1
    assert wanted([0.0, 0.0], target=2) == 1  # idle: min, never 0
    assert wanted([1.0] * 4, target=4) == 4  # clamped to max
    assert wanted([0.9], min_replicas=2) == 2


def test_unreported_replicas_never_scale_down_but_known_load_scales_up():
    assert wanted([0.1, None, None], target=3) == 3  # a starting replica: hold, not 1
    assert wanted([], target=2) == 2  # nothing running reported yet
    assert wanted([1.0, 1.0, None], target=3) == 4  # what is known already needs more
    assert wanted([float("nan"), 0.1], target=2) == 2  # a bad value counts as unreported


def test_steady_load_below_target_stays_at_one(monkeypatch):
    assert set(simulate(EXPERTS, [0.5] * 60, busy_split, monkeypatch)) == {1}


def test_ramp_scales_one_two_three_after_the_upscale_delay(monkeypatch):
    trace = [0.4] * 10 + [1.0] * 10 + [1.6] * 10
    targets = simulate(EXPERTS, trace, busy_split, monkeypatch)
    assert steps(targets) == [1, 2, 3]
    assert targets.index(2) == 15 and targets.index(3) == 25  # load rose at ticks 10 and 20; delay 5 s


def test_spike_shorter_than_the_upscale_delay_does_not_scale(monkeypatch):
    assert set(simulate(EXPERTS, [0.3] * 10 + [2.0] * 4 + [0.3] * 30, busy_split, monkeypatch)) == {1}
    assert max(simulate(EXPERTS, [0.3] * 10 + [2.0] * 6 + [0.3] * 10, busy_split, monkeypatch)) > 1


def test_idle_returns_to_min_after_the_downscale_delay(monkeypatch):
    trace = [2.0] * 20 + [0.0] * 40
    targets = simulate(EXPERTS, trace, busy_split, monkeypatch)
    assert targets[19] == 4  # 2.0 / 0.6 -> 4
    assert targets[20 + 29] == 4 and targets[20 + 30] == 1  # 30 s after the load stopped
    assert steps(targets[20:]) == [4, 1]


def test_overload_is_clamped_to_max(monkeypatch):
    targets = simulate(EXPERTS, [50.0] * 40, busy_split, monkeypatch)
    assert max(targets) == 4 and targets[-1] == 4


def test_a_silent_running_replica_holds_the_target(monkeypatch):
    """Replica 0 reports almost no load, the others nothing yet: no scale-down however long."""
    cfg = ExpertAutoscaling(min_replicas=1, max_replicas=4, upscale_delay_s=0, downscale_delay_s=0)
    targets = simulate(cfg, [3.0] * 3 + [0.0] * 20,
                       lambda load, n: {BUSY: [0.01] + [None] * (n - 1)} if load == 0 else busy_split(load, n),
                       monkeypatch)
    assert targets[2] == 4 and set(targets[3:]) == {4}


def test_policy_reads_busy_from_the_context():
    cfg = AutoscalingConfig(**serve_autoscaling_config(EXPERTS))
    policy = ExpertLoadPolicy(target_busy=0.6, min_replicas=1, max_replicas=4)
    metrics = lambda: {BUSY: {REPLICAS[0]: 0.9, REPLICAS[1]: 0.9}, "tokens_per_s": {REPLICAS[0]: 10.0}}  # noqa: E731
    n, state = policy(context(cfg, 2, 2, metrics, {}, 0.0))
    assert n == 3 and state == {"busy_sum": pytest.approx(1.8), "unreported": 0}
    assert policy(context(cfg, 2, 2, None, {}, 0.0))[0] == 2  # no custom metrics at all: hold


# ---------------------------------------------------------------- attention replicas

ATTENTION = AttentionAutoscaling(min_replicas=1, max_replicas=4, target_sequences=32, kv_usage_scale_up=0.85,
                                 upscale_delay_s=5, downscale_delay_s=60, look_back_s=5)


def attention_split(tick, running: int) -> dict:
    sequences, kv = tick
    return {SEQUENCES: [sequences / running] * running, KV_USAGE: [kv] + [0.1] * (running - 1)}


def want_attention(sequences, kv, target=1, **kw):
    return attention_replicas_wanted(sequences, kv, target, **{"target_sequences": 32, "kv_usage_scale_up": 0.85,
                                                              "min_replicas": 1, "max_replicas": 4, **kw})


def test_attention_decision_on_sequences_and_kv_pressure():
    assert want_attention([20], [0.3]) == 1
    assert want_attention([32, 32], [0.3, 0.3], target=2) == 2
    assert want_attention([40, 30], [0.3, 0.3], target=2) == 3
    assert want_attention([3], [0.9]) == 2  # few sequences, but the cache is nearly full
    assert want_attention([3, 2], [0.9, 0.1], target=3) == 3  # one already starting: not asked for twice
    assert want_attention([3] * 4, [0.95] * 4, target=4) == 4  # clamped
    assert want_attention([1, None], [0.1, None], target=2) == 2  # unreported: hold
    assert want_attention([0, 0], [0.0, 0.0], target=2) == 1


def test_attention_steady_and_ramp(monkeypatch):
    assert set(simulate(ATTENTION, [(20, 0.2)] * 30, attention_split, monkeypatch)) == {1}
    targets = simulate(ATTENTION, [(20, 0.2)] * 10 + [(50, 0.3)] * 10 + [(90, 0.4)] * 10, attention_split,
                       monkeypatch)
    assert steps(targets) == [1, 2, 3]


def test_kv_pressure_scales_up_with_few_sequences(monkeypatch):
    targets = simulate(ATTENTION, [(4, 0.2)] * 5 + [(4, 0.9)] * 6 + [(4, 0.3)] * 30, attention_split, monkeypatch)
    assert targets[4] == 1 and targets[10] == 2  # over the threshold for 5 s
    assert set(targets[10:]) == {2}  # and not back down before downscale_delay_s (60 s)


# ---------------------------------------------------------------- configs

@pytest.mark.parametrize("model", [ExpertAutoscaling, AttentionAutoscaling])
def test_config_validation(model):
    with pytest.raises(ValueError, match=r"min_replicas \(3\) must be <= max_replicas \(2\)"):
        model(min_replicas=3, max_replicas=2)
    with pytest.raises(ValueError, match="min_replicas"):
        model(min_replicas=0)
    with pytest.raises(ValueError, match="bogus"):
        model(bogus=1)
    assert all(f.description for f in model.model_fields.values())
    assert model().min_replicas == 1 and model().max_replicas == 4


def test_config_bounds():
    with pytest.raises(ValueError, match="target_busy"):
        ExpertAutoscaling(target_busy=0)
    with pytest.raises(ValueError, match="kv_usage_scale_up"):
        AttentionAutoscaling(kv_usage_scale_up=1.5)
    assert ExpertAutoscaling().model_dump() == {"min_replicas": 1, "max_replicas": 4, "target_busy": 0.6,
                                                "upscale_delay_s": 5, "downscale_delay_s": 30, "look_back_s": 5}
    assert AttentionAutoscaling().downscale_delay_s == 60 and AttentionAutoscaling().target_sequences == 32


def test_per_group_override_merges_over_the_base():
    base = ExpertAutoscaling(max_replicas=8, target_busy=0.5)
    overrides = {1: {"max_replicas": 2}, "2": ExpertAutoscalingOverride(target_busy=0.8), 3: None}
    g0, g1, g2, g3 = expert_autoscaling_by_group(base, overrides, 4)
    assert g0 == base
    assert (g1.max_replicas, g1.target_busy) == (2, 0.5)
    assert (g2.max_replicas, g2.target_busy) == (8, 0.8)
    assert g3 is None  # null: this group keeps fixed replicas
    assert expert_autoscaling_for(None, None, 0) is None  # absent: fixed replicas as today
    alone = expert_autoscaling_for(None, {0: {"max_replicas": 6}}, 0)  # only this group autoscales
    assert alone == ExpertAutoscaling(max_replicas=6)
    assert expert_autoscaling_for(None, {0: {"max_replicas": 6}}, 1) is None
    assert all(f.description for f in ExpertAutoscalingOverride.model_fields.values())


def test_override_errors_name_the_group_and_field():
    base = ExpertAutoscaling(max_replicas=8)
    with pytest.raises(ValueError, match=r"expert_autoscaling_groups\[1\]: min_replicas \(9\) must be <= max"):
        expert_autoscaling_for(base, {1: {"min_replicas": 9}}, 1)
    with pytest.raises(ValueError, match=r"expert_autoscaling_groups\[0\]: target_busy: "):
        expert_autoscaling_for(base, {0: {"target_busy": 2.0}}, 0)
    with pytest.raises(ValueError, match=r"expert_autoscaling_groups\[2\]: bogus: "):
        expert_autoscaling_for(base, {2: {"bogus": 1}}, 2)
    with pytest.raises(ValueError, match=r"group\(s\) \[5\].*3 expert groups"):
        expert_autoscaling_by_group(base, {5: {}}, 3)


@pytest.mark.parametrize("text, expected", [("3", 3), ("1:4", (1, 4)), (" 2 : 2 ", (2, 2)), ("1", 1)])
def test_parse_replicas(text, expected):
    assert parse_replicas(text) == expected


@pytest.mark.parametrize("text", ["0", "0:4", "4:1", "a", "1:b", "", "1:2:3", "-1", "1.5"])
def test_parse_replicas_rejects(text):
    with pytest.raises(ValueError, match=f"replicas {text!r}"):
        parse_replicas(text)


def test_replicas_arg_for_argparse(capsys):
    parser = argparse.ArgumentParser()
    parser.add_argument("--expert-replicas", type=replicas_arg)
    assert parser.parse_args(["--expert-replicas", "1:4"]).expert_replicas == (1, 4)
    with pytest.raises(SystemExit):
        parser.parse_args(["--expert-replicas", "4:1"])
    assert "argument --expert-replicas: replicas '4:1': MIN (4) must be <= MAX (1)" in capsys.readouterr().err


# ---------------------------------------------------------------- Serve's view of the config

@pytest.mark.parametrize("settings, path, cls", [(EXPERTS, EXPERT_POLICY, ExpertLoadPolicy),
                                                 (ATTENTION, ATTENTION_POLICY, AttentionDemandPolicy)])
def test_serve_accepts_the_autoscaling_config(settings, path, cls):
    d = serve_autoscaling_config(settings)
    assert d["initial_replicas"] == settings.min_replicas and d["look_back_period_s"] == 5
    assert d["metrics_interval_s"] == 1.0 and d["policy"]["policy_function"] == path
    cfg = AutoscalingConfig(**d)
    assert (cfg.min_replicas, cfg.max_replicas, cfg.upscale_delay_s) == (1, 4, 5)
    assert cfg.downscale_delay_s == settings.downscale_delay_s
    assert DeploymentSchema(name="x", autoscaling_config=d).autoscaling_config is not None
    module, name = path.split(":")
    assert getattr(importlib.import_module(module), name) is cls
    built = _resolve_policy_callable(cfg.policy)  # Serve's own copy, pickled by value: instantiated with kwargs
    assert type(built).__name__ == cls.__name__ and built.min_replicas == 1 and built.max_replicas == 4


def test_serve_config_checks_look_back_against_the_reporting_interval():
    with pytest.raises(ValueError, match="look_back_s"):
        serve_autoscaling_config(ExpertAutoscaling(look_back_s=1), metrics_interval_s=1.0)
    with pytest.raises(TypeError):
        serve_autoscaling_config({"min_replicas": 1})


def test_policy_kwargs_are_checked():
    with pytest.raises(ValueError, match="min_replicas"):
        ExpertLoadPolicy(target_busy=0.6, min_replicas=0, max_replicas=2)
    with pytest.raises(ValueError, match="target_busy"):
        ExpertLoadPolicy(target_busy=0, min_replicas=1, max_replicas=2)
    with pytest.raises(ValueError, match="kv_usage_scale_up"):
        AttentionDemandPolicy(target_sequences=32, kv_usage_scale_up=0, min_replicas=1, max_replicas=2)
