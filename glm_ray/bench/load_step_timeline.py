"""A load step's schedule, and its timeline: one row per second, a pure function of what was recorded.

Everything is on one clock, seconds from the start of the run. A request is its send and end times,
the arrival time of each output token and its error, if any; a metrics sample is what /metrics said
at one moment. Row i covers [i, i + 1) (the last row may be shorter: its `seconds` says): the
requests that ended in it, the tokens that arrived in it, and the last good metrics sample taken
before it ended.
"""

from __future__ import annotations

import argparse
import math
from collections import Counter
from dataclasses import dataclass, field

from glm_ray.bench.stats import percentile

DEFAULT_LOAD_STEP = "1:20,16:60,1:40"
MAX_CLIENTS = 1024  # one thread each


@dataclass(frozen=True)
class Phase:
    """`num_clients` closed-loop clients for `duration_s` seconds."""

    num_clients: int
    duration_s: float


def parse_phases(text: str) -> list[Phase]:
    """argparse type of --load-step: `CLIENTS:SECONDS,...`, e.g. "1:20,16:60,1:40"."""
    phases = []
    for part in text.split(","):
        clients, sep, seconds = part.strip().partition(":")
        try:
            phase = Phase(int(clients), float(seconds)) if sep else None
        except ValueError:
            phase = None
        if phase is None or not 0 <= phase.num_clients <= MAX_CLIENTS or not 0 < phase.duration_s < math.inf:
            raise argparse.ArgumentTypeError(
                f"{text!r}: phase {part.strip()!r} is not CLIENTS:SECONDS (clients 0..{MAX_CLIENTS}, "
                f"seconds > 0), e.g. {DEFAULT_LOAD_STEP}")
        phases.append(phase)
    if not any(p.num_clients for p in phases):
        raise argparse.ArgumentTypeError(f"{text!r}: every phase has 0 clients, so nothing would be sent")
    return phases


def phase_bounds(phases: list[Phase]) -> list[tuple[float, float]]:
    """(start_s, end_s) of each phase."""
    out, start = [], 0.0
    for p in phases:
        out.append((start, start + p.duration_s))
        start += p.duration_s
    return out


def phase_at(phases: list[Phase], t_s: float) -> int | None:
    """The phase running at `t_s`; None after the last (the in-flight requests finishing)."""
    for i, (start, end) in enumerate(phase_bounds(phases)):
        if start <= t_s < end:
            return i
    return None


@dataclass(frozen=True)
class RequestRecord:
    """One request as its client saw it."""

    phase: int  # at its send time
    sent_s: float
    end_s: float
    token_times_s: tuple[float, ...]  # arrival of each output token
    error: str | None = None  # a non-200 answer or a mid-stream error, with the server's message

    @property
    def latency_s(self) -> float:
        return self.end_s - self.sent_s

    @property
    def ttft_s(self) -> float | None:
        return self.token_times_s[0] - self.sent_s if self.token_times_s else None


@dataclass(frozen=True)
class MetricsSample:
    """One read of /metrics: replicas by state per deployment, load per expert group and attention replica."""

    t_s: float
    deployments: dict[str, dict[str, int]] = field(default_factory=dict)  # name -> running/starting/draining
    groups: dict[str, dict[str, float]] = field(default_factory=dict)  # group -> busy_fraction, tokens_per_s
    attention: dict[str, dict[str, float]] = field(default_factory=dict)  # replica -> sequences, kv_usage
    error: str | None = None


def _percentiles(values: list[float]) -> tuple[float | None, float | None]:
    return percentile(values, 50), percentile(values, 99)


def _sample_fields(sample: MetricsSample | None) -> dict:
    if sample is None:
        return dict.fromkeys(("metrics_t_s", "replicas", "group_busy_fraction", "group_tokens_per_s",
                              "attention_sequences"))
    return {"metrics_t_s": round(sample.t_s, 3), "replicas": sample.deployments,
            "group_busy_fraction": {g: v["busy_fraction"] for g, v in sample.groups.items()},
            "group_tokens_per_s": {g: v["tokens_per_s"] for g, v in sample.groups.items()},
            "attention_sequences": {a: v["sequences"] for a, v in sample.attention.items()}}


def build_timeline(phases: list[Phase], requests: list[RequestRecord], samples: list[MetricsSample],
                   end_s: float) -> list[dict]:
    """One row per second of [0, end_s); rates are per second of the row's own length."""
    num_rows = max(1, math.ceil(end_s))
    tokens = [0] * num_rows
    in_flight = [0.0] * num_rows  # request-seconds in each second: the mean number in flight
    ended: list[list[RequestRecord]] = [[] for _ in range(num_rows)]
    for r in requests:
        for t in r.token_times_s:
            tokens[min(int(t), num_rows - 1)] += 1
        ended[min(int(r.end_s), num_rows - 1)].append(r)
        for i in range(int(r.sent_s), min(num_rows, math.ceil(r.end_s))):
            in_flight[i] += max(0.0, min(r.end_s, i + 1) - max(r.sent_s, i))
    good = sorted((s for s in samples if s.error is None), key=lambda s: s.t_s)
    rows = []
    for i in range(num_rows):
        phase = phase_at(phases, i)
        ok = [r for r in ended[i] if r.error is None]
        latency = _percentiles([r.latency_s for r in ok])
        ttft = _percentiles([r.ttft_s for r in ok if r.ttft_s is not None])
        sample = next((s for s in reversed(good) if s.t_s < i + 1), None)
        seconds = min(1.0, end_s - i) if end_s > i else 1.0
        rows.append({
            "t_s": i, "seconds": round(seconds, 3), "phase": phase,
            "clients": 0 if phase is None else phases[phase].num_clients,
            "in_flight": round(in_flight[i] / seconds, 3), "requests_completed": len(ok),
            "errors": len(ended[i]) - len(ok), "output_tokens": tokens[i],
            "output_tokens_per_s": tokens[i] / seconds, "latency_p50_s": latency[0], "latency_p99_s": latency[1],
            "ttft_p50_s": ttft[0], "ttft_p99_s": ttft[1],
            **_sample_fields(sample),
        })
    return rows


def _max_running(samples: list[MetricsSample]) -> dict[str, int]:
    out: dict[str, int] = {}
    for s in samples:
        for name, states in s.deployments.items():
            out[name] = max(out.get(name, 0), states.get("running", 0))
    return out


def summarize(phases: list[Phase], requests: list[RequestRecord], samples: list[MetricsSample],
              end_s: float) -> dict:
    """Totals, errors by message, and each phase's throughput, latencies and peak running replicas."""
    ok = [r for r in requests if r.error is None]
    errors = Counter(r.error for r in requests if r.error is not None)
    first_seen = {}
    for r in sorted(requests, key=lambda r: r.end_s):
        first_seen.setdefault(r.error, r.end_s)
    good = [s for s in samples if s.error is None]
    per_phase = []
    for i, (start, end) in enumerate(phase_bounds(phases)):
        done = [r for r in requests if start <= r.end_s < end]
        done_ok = [r for r in done if r.error is None]
        latency = _percentiles([r.latency_s for r in done_ok])
        ttft = _percentiles([r.ttft_s for r in done_ok if r.ttft_s is not None])
        num_tokens = sum(start <= t < end for r in requests for t in r.token_times_s)
        per_phase.append({
            "index": i, "clients": phases[i].num_clients, "start_s": start, "end_s": end,
            "requests_completed": len(done_ok), "errors": len(done) - len(done_ok),
            "output_tokens_per_s": num_tokens / (end - start), "latency_p50_s": latency[0],
            "latency_p99_s": latency[1], "ttft_p50_s": ttft[0], "ttft_p99_s": ttft[1],
            "max_running_replicas": _max_running([s for s in good if start <= s.t_s < end])})
    num_tokens = sum(len(r.token_times_s) for r in requests)
    latency = _percentiles([r.latency_s for r in ok])
    ttft = _percentiles([r.ttft_s for r in ok if r.ttft_s is not None])
    return {
        "duration_s": end_s, "num_requests": len(requests), "num_completed": len(ok),
        "num_errors": len(requests) - len(ok), "num_output_tokens": num_tokens,
        "output_tokens_per_s": num_tokens / end_s if end_s > 0 else None,
        "latency_p50_s": latency[0], "latency_p99_s": latency[1], "ttft_p50_s": ttft[0], "ttft_p99_s": ttft[1],
        "errors": [{"message": m, "count": n, "first_t_s": first_seen[m]} for m, n in errors.most_common()],
        "num_metrics_samples": len(samples), "num_metrics_errors": len(samples) - len(good),
        "metrics_errors": sorted({s.error for s in samples if s.error is not None})[:10],
        "max_running_replicas": _max_running(good),
        "phases": per_phase,
    }
