"""How many replicas an expert group or the attention deployment wants: Serve custom autoscaling policies.

Replicas report load through `record_autoscaling_stats` (metric names below); Serve averages each over
`look_back_period_s` per replica and calls a policy every controller tick (~0.1 s) with those averages in
`ctx.aggregated_metrics[name][replica_id]`. A policy answers a replica count; Serve then applies the
upscale/downscale delays and the min/max bounds itself (`ray.serve.autoscaling_policy._apply_autoscaling_config`).

Each policy is a class built once from `policy_kwargs` and called as `policy(ctx) -> (replicas, state)`; its
decision is a pure function of plain numbers beside it, tested without Ray. Serve cloudpickles this module's
policy classes *by value* into the controller, so they use the standard library only (no pydantic, no torch):
the controller needs neither glm_ray nor its dependencies installed.

Missing data never scales down: a running replica that has not reported yet (just started, or its first push
still in flight) already takes traffic, so the reported sum underestimates the load. While any running replica
is unreported the answer is at least the current target: the reported sum can still scale up (it is a lower
bound on the load), never down.
"""

from __future__ import annotations

import argparse
import math
from typing import Any, Mapping, Sequence

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, model_validator

# Metrics the replicas report through `record_autoscaling_stats`.
BUSY = "busy_fraction"  # expert replica: seconds computing per wall second over the look-back window, 0..1
TOKENS = "tokens_per_s"  # expert replica: routed tokens computed per second (reported for dashboards)
SEQUENCES = "sequences"  # attention replica: sequences running + waiting
KV_USAGE = "kv_usage"  # attention replica: fraction of KV-cache blocks in use, 0..1

EXPERT_POLICY = "glm_ray.serving.autoscaling:ExpertLoadPolicy"
ATTENTION_POLICY = "glm_ray.serving.autoscaling:AttentionDemandPolicy"

_EPS = 1e-9  # so 1.2 / 0.6 wants 2 replicas, not 3, whatever the float rounding


# ---------------------------------------------------------------- configs (user-facing edge)

class _Bounds(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="after")
    def _min_le_max(self):
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) must be <= max_replicas ({self.max_replicas})")
        return self


class ExpertAutoscaling(_Bounds):
    """Autoscaling of one expert group's replicas on how busy they are computing."""

    min_replicas: int = Field(1, ge=1, description="fewest replicas; at least 1, as a group with none stalls "
                              "every engine step")
    max_replicas: int = Field(4, ge=1, description="most replicas")
    target_busy: float = Field(0.6, gt=0, le=1, description="busy fraction each replica should run at: wanted "
                               "replicas = ceil(sum of the replicas' busy fractions / target_busy)")
    upscale_delay_s: float = Field(5.0, ge=0, description="seconds more replicas must stay wanted before Serve "
                                   "adds them")
    downscale_delay_s: float = Field(30.0, ge=0, description="seconds fewer replicas must stay wanted before Serve "
                                     "removes any")
    look_back_s: float = Field(5.0, gt=0, description="seconds of reported metrics Serve averages per replica")


class AttentionAutoscaling(_Bounds):
    """Autoscaling of the attention replicas on sequences per replica, early on KV-cache pressure."""

    min_replicas: int = Field(1, ge=1, description="fewest attention replicas; at least 1")
    max_replicas: int = Field(4, ge=1, description="most attention replicas")
    target_sequences: int = Field(32, ge=1, description="sequences (running + waiting) each replica should hold: "
                                    "wanted replicas = ceil(total sequences / target_sequences)")
    kv_usage_scale_up: float = Field(0.85, gt=0, le=1, description="when any replica's KV-cache usage reaches this "
                                     "fraction, want at least one replica more than are running")
    upscale_delay_s: float = Field(5.0, ge=0, description="seconds more replicas must stay wanted before Serve "
                                   "adds them")
    downscale_delay_s: float = Field(60.0, ge=0, description="seconds fewer replicas must stay wanted before Serve "
                                     "removes any")
    look_back_s: float = Field(5.0, gt=0, description="seconds of reported metrics Serve averages per replica")


# Per-group override: any subset of ExpertAutoscaling's fields; unset fields come from the base. Built from
# ExpertAutoscaling so the two cannot drift; ranges are checked on the merged result.
ExpertAutoscalingOverride = create_model(
    "ExpertAutoscalingOverride",
    __config__=ConfigDict(extra="forbid"),
    __doc__="Fields of one expert group's autoscaling that differ from `expert_autoscaling`.",
    **{name: (f.annotation | None, Field(None, description=f"{f.description} (default: the base value)"))
       for name, f in ExpertAutoscaling.model_fields.items()},
)

Override = Mapping[str, Any] | BaseModel | None


def expert_autoscaling_for(base: ExpertAutoscaling | None, overrides: Mapping[int, Override] | None,
                           group: int) -> ExpertAutoscaling | None:
    """Group `group`'s autoscaling: its override (any subset of fields) over `base`.

    No base and no override: None (fixed replicas). An override without a base autoscales that group alone,
    over the defaults. An override of None (YAML `null`) keeps that group at fixed replicas."""
    overrides = {int(g): o for g, o in (overrides or {}).items()}
    if group in overrides and overrides[group] is None:
        return None
    if group not in overrides:
        return base
    override = overrides[group]
    where = f"expert_autoscaling_groups[{group}]"
    try:
        if not isinstance(override, BaseModel):
            override = ExpertAutoscalingOverride.model_validate(override)
        fields = override.model_dump(exclude_none=True)
        return ExpertAutoscaling.model_validate({**(base.model_dump() if base else {}), **fields})
    except ValidationError as e:
        raise ValueError(f"{where}: {_errors(e)}") from None


def expert_autoscaling_by_group(base: ExpertAutoscaling | None, overrides: Mapping[int, Override] | None,
                                num_groups: int) -> list[ExpertAutoscaling | None]:
    """`expert_autoscaling_for` of every group; an override naming no group in range is an error."""
    stray = sorted(int(g) for g in (overrides or {}) if not 0 <= int(g) < num_groups)
    if stray:
        raise ValueError(f"expert_autoscaling_groups names group(s) {stray}, but there are {num_groups} "
                         f"expert groups (0..{num_groups - 1})")
    return [expert_autoscaling_for(base, overrides, g) for g in range(num_groups)]


def _errors(e: ValidationError) -> str:
    def one(err) -> str:
        where = ".".join(map(str, err["loc"]))
        return f"{where}: " * bool(where) + err["msg"].removeprefix("Value error, ")
    return "; ".join(one(err) for err in e.errors())


def serve_autoscaling_config(a: ExpertAutoscaling | AttentionAutoscaling, metrics_interval_s: float = 1.0) -> dict:
    """A deployment's `autoscaling_config` (for `.options(...)` or a Serve config file) running our policy."""
    if isinstance(a, ExpertAutoscaling):
        policy = {"policy_function": EXPERT_POLICY,
                  "policy_kwargs": {"target_busy": a.target_busy, "min_replicas": a.min_replicas,
                                    "max_replicas": a.max_replicas}}
    elif isinstance(a, AttentionAutoscaling):
        policy = {"policy_function": ATTENTION_POLICY,
                  "policy_kwargs": {"target_sequences": a.target_sequences, "kv_usage_scale_up": a.kv_usage_scale_up,
                                    "min_replicas": a.min_replicas, "max_replicas": a.max_replicas}}
    else:
        raise TypeError(f"expected ExpertAutoscaling or AttentionAutoscaling, got {type(a).__name__}")
    if not a.look_back_s > metrics_interval_s:
        raise ValueError(f"look_back_s ({a.look_back_s}) must be longer than metrics_interval_s "
                         f"({metrics_interval_s}), the replicas' reporting interval, to average over any samples")
    return {"min_replicas": a.min_replicas, "max_replicas": a.max_replicas, "initial_replicas": a.min_replicas,
            "upscale_delay_s": a.upscale_delay_s, "downscale_delay_s": a.downscale_delay_s,
            "look_back_period_s": a.look_back_s, "metrics_interval_s": metrics_interval_s, "policy": policy}


# ---------------------------------------------------------------- CLI values

def parse_replicas(text: str) -> int | tuple[int, int]:
    """"3" -> 3 fixed replicas; "1:4" -> (1, 4), autoscale between 1 and 4."""
    parts = [p.strip() for p in str(text).split(":")]
    try:
        if len(parts) > 2:
            raise ValueError
        counts = [int(p) for p in parts]
    except ValueError:
        raise ValueError(f"replicas {text!r}: expected a count N or a range MIN:MAX, e.g. 2 or 1:4") from None
    if any(c < 1 for c in counts):
        raise ValueError(f"replicas {text!r}: counts must be >= 1 (a deployment never scales to zero)")
    if len(counts) == 1:
        return counts[0]
    if counts[0] > counts[1]:
        raise ValueError(f"replicas {text!r}: MIN ({counts[0]}) must be <= MAX ({counts[1]})")
    return counts[0], counts[1]


def replicas_arg(text: str) -> int | tuple[int, int]:
    """`parse_replicas` as an argparse `type=`: argparse prints the message after the option's name."""
    try:
        return parse_replicas(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


# ---------------------------------------------------------------- decisions (pure) and Serve policies

def _ceil(x: float) -> int:
    return math.ceil(x - _EPS)


def _clamp(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, n))


def _reported(values: Sequence[float | None]) -> list[float]:
    return [max(0.0, float(v)) for v in values if v is not None and math.isfinite(v)]


def expert_replicas_wanted(busy: Sequence[float | None], target_replicas: int, *, target_busy: float,
                           min_replicas: int, max_replicas: int) -> int:
    """Replicas an expert group wants. `busy`: each running replica's busy fraction, None where it has not
    reported; `target_replicas`: Serve's current target."""
    reported = _reported(busy)
    wanted = _ceil(sum(reported) / target_busy)
    if len(reported) < len(busy) or not busy:  # load unknown: hold, or go up on what is known
        wanted = max(wanted, target_replicas)
    return _clamp(wanted, min_replicas, max_replicas)


def attention_replicas_wanted(sequences: Sequence[float | None], kv_usage: Sequence[float | None],
                              target_replicas: int, *, target_sequences: float, kv_usage_scale_up: float,
                              min_replicas: int, max_replicas: int) -> int:
    """Attention replicas wanted. `sequences`, `kv_usage`: per running replica, None where not reported;
    `target_replicas`: Serve's current target. KV pressure asks for one more than are *running*, so a replica
    still starting is not asked for again."""
    reported = _reported(sequences)
    wanted = _ceil(sum(reported) / target_sequences)
    if any(k >= kv_usage_scale_up for k in _reported(kv_usage)):
        wanted = max(wanted, len(sequences) + 1)
    if len(reported) < len(sequences) or not sequences:
        wanted = max(wanted, target_replicas)
    return _clamp(wanted, min_replicas, max_replicas)


def _per_replica(ctx, name: str) -> list[float | None]:
    """The look-back average of `name` for each running replica, None where it has none yet."""
    metrics = (ctx.aggregated_metrics or {}).get(name) or {}
    return [metrics.get(r) for r in ctx.running_replicas]


def _check_bounds(min_replicas: int, max_replicas: int) -> None:
    if not 1 <= min_replicas <= max_replicas:
        raise ValueError(f"need 1 <= min_replicas <= max_replicas, got {min_replicas} and {max_replicas}")


class ExpertLoadPolicy:
    """Serve policy of an `ExpertGroup_<g>` deployment: replicas to keep each near `target_busy`."""

    def __init__(self, target_busy: float, min_replicas: int, max_replicas: int):
        _check_bounds(min_replicas, max_replicas)
        if not 0 < target_busy <= 1:
            raise ValueError(f"target_busy must be in (0, 1], got {target_busy}")
        self.target_busy, self.min_replicas, self.max_replicas = target_busy, min_replicas, max_replicas

    def __call__(self, ctx) -> tuple[int, dict]:
        busy = _per_replica(ctx, BUSY)
        wanted = expert_replicas_wanted(busy, ctx.target_num_replicas, target_busy=self.target_busy,
                                        min_replicas=self.min_replicas, max_replicas=self.max_replicas)
        return wanted, {"busy_sum": sum(_reported(busy)), "unreported": len(busy) - len(_reported(busy))}


class AttentionDemandPolicy:
    """Serve policy of the `AttentionReplica` deployment: replicas to hold `target_sequences` each, one more
    early when a replica's KV cache passes `kv_usage_scale_up`."""

    def __init__(self, target_sequences: float, kv_usage_scale_up: float, min_replicas: int, max_replicas: int):
        _check_bounds(min_replicas, max_replicas)
        if not target_sequences > 0 or not 0 < kv_usage_scale_up <= 1:
            raise ValueError(f"need target_sequences > 0 and kv_usage_scale_up in (0, 1], got {target_sequences} "
                             f"and {kv_usage_scale_up}")
        self.target_sequences, self.kv_usage_scale_up = target_sequences, kv_usage_scale_up
        self.min_replicas, self.max_replicas = min_replicas, max_replicas

    def __call__(self, ctx) -> tuple[int, dict]:
        sequences, kv = _per_replica(ctx, SEQUENCES), _per_replica(ctx, KV_USAGE)
        wanted = attention_replicas_wanted(sequences, kv, ctx.target_num_replicas,
                                           target_sequences=self.target_sequences,
                                           kv_usage_scale_up=self.kv_usage_scale_up,
                                           min_replicas=self.min_replicas, max_replicas=self.max_replicas)
        return wanted, {"sequences": sum(_reported(sequences)), "max_kv_usage": max(_reported(kv), default=0.0),
                        "unreported": len(sequences) - len(_reported(sequences))}
