"""How evenly routed work spreads over expert groups, and over the replicas of a group.

Balancedness of a set of loads is mean / max (vLLM's definition per rank): 1.0 when every group
does the same work, 1/G when one of G groups does it all. Per MoE layer it is taken over the
(token, expert) pairs each group computed for that layer in the router's window, under the
placement in force (with redundant experts, as attention replicas split them over the copies);
a layer's slowest group sets the step's pace, so the minimum over layers
is the figure to watch. Over the replicas of one group it is taken over each replica's tokens/s.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence


def balancedness(loads: Sequence[float]) -> float | None:
    """mean / max of `loads`; None when there is nothing to balance (no loads, or all zero)."""
    if not loads or max(loads) <= 0:
        return None
    return sum(loads) / len(loads) / max(loads)


def layer_balancedness(group_tokens_by_layer: Mapping[str, Sequence[float]]) -> dict[str, float]:
    """{layer: balancedness over groups} for every layer that routed any token."""
    out = {}
    for layer, per_group in group_tokens_by_layer.items():
        b = balancedness(per_group)
        if b is not None:
            out[layer] = b
    return out


def summarize(group_tokens_by_layer: Mapping[str, Sequence[float]],
              replica_tokens_per_s: Mapping[str, Sequence[float]]) -> dict:
    """What `/v1/experts`, `/metrics` and `glm-ray status` show: per layer, its minimum and mean
    over layers (None before any token was routed), and per group over its replicas (only groups
    with two or more replicas and some load)."""
    layers = layer_balancedness(group_tokens_by_layer)
    replicas = {}
    for group, rates in replica_tokens_per_s.items():
        b = balancedness(rates) if len(rates) > 1 else None
        if b is not None:
            replicas[group] = b
    return {"layers": layers,
            "min": min(layers.values()) if layers else None,
            "mean": sum(layers.values()) / len(layers) if layers else None,
            "replicas": replicas,
            "definition": "mean / max tokens per expert group, per MoE layer over the router's window (1.0 is "
                          "even; 1/G is one group doing all); replicas: mean / max tokens/s over a group's replicas"}
