"""Balancedness: mean / max tokens per expert group per MoE layer (vLLM's definition per rank), and
over the replicas of a group, as /v1/experts, /metrics and `glm-ray status` show it."""

import pytest

from glm_ray.router.balance import balancedness, layer_balancedness, summarize
from glm_ray.router.eplb import group_loads
from glm_ray.serving.openai.metrics import Metrics

GROUPS = [[0, 1], [2, 3]]


def group_tokens(per_expert, groups):
    """Without copies: the tokens of the experts each group holds, summed."""
    return group_loads(groups, per_expert)


def by_group(tokens_per_expert: dict) -> dict:
    """{layer: tokens per group} of the contiguous two-group placement, as the router sums them."""
    return {layer: group_tokens(counts, GROUPS) for layer, counts in tokens_per_expert.items()}


def test_even_is_one_and_one_group_doing_everything_is_one_over_g():
    assert balancedness([5, 5, 5, 5]) == 1.0
    assert balancedness([8, 0, 0, 0]) == pytest.approx(0.25)
    assert balancedness([3, 1]) == pytest.approx(2 / 3)  # mean 2, max 3
    assert balancedness([]) is None and balancedness([0, 0]) is None  # nothing routed: nothing to say


def test_a_groups_tokens_are_those_of_the_experts_it_holds():
    assert group_tokens([4, 0, 1, 3], GROUPS) == [4, 4]
    assert group_tokens([4, 0, 1, 3], [[0], [1, 2, 3]]) == [4, 4]
    # a hot expert alone in its group makes the layer unbalanced even when experts are few
    assert layer_balancedness(by_group({"1": [9, 1, 0, 0], "2": [1, 1, 1, 1], "3": [0, 0, 0, 0]})) == \
        {"1": pytest.approx(0.5), "2": 1.0}


def test_summary_min_mean_and_replicas():
    s = summarize(by_group({"1": [9, 1, 0, 0], "2": [2, 2, 3, 1]}), {"0": [100.0, 50.0], "1": [80.0], "2": [0.0, 0.0]})
    assert s["layers"] == {"1": pytest.approx(0.5), "2": 1.0}
    assert s["min"] == pytest.approx(0.5) and s["mean"] == pytest.approx(0.75)
    assert s["replicas"] == {"0": pytest.approx(0.75)}  # one replica, or no load: nothing to balance
    empty = summarize({}, {})
    assert empty["min"] is None and empty["mean"] is None and empty["layers"] == {}


def test_metrics_show_each_layer_and_drop_layers_that_left_the_window():
    m = Metrics()
    text = m.render({"balancedness": summarize(by_group({"1": [9, 1, 0, 0], "2": [1, 1, 1, 1]}),
                                               {"0": [100.0, 50.0]})}).decode()
    assert 'glm_ray_expert_balancedness{layer="1"} 0.5' in text
    assert 'glm_ray_expert_balancedness{layer="2"} 1.0' in text
    assert 'glm_ray_expert_balancedness_summary{stat="min"} 0.5' in text
    assert 'glm_ray_expert_balancedness_summary{stat="mean"} 0.75' in text
    assert 'glm_ray_expert_replica_balancedness{group="0"} 0.75' in text
    text = m.render({"balancedness": summarize(by_group({"2": [1, 1, 1, 1]}), {})}).decode()
    assert 'layer="1"' not in text and 'glm_ray_expert_replica_balancedness{' not in text
