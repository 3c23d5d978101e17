"""From one system's raw run (per-request token times) to the figures the report shows.

A run is the dict a system runner returns: `wall_time_s`, `num_output_tokens` (requested tokens,
the only ones counted), `ttft_s` (per request, seconds from arrival, or None) and `token_times_s`
(per request, seconds from the start of the timed run, one entry per requested output token).
Inter-token latencies are pooled over all requests: every gap between consecutive tokens of one
request is one sample.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100) with linear interpolation between order statistics; None if empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def _summary_ms(values: Sequence[float]) -> dict:
    if not values:
        return {"p50": None, "p99": None, "mean": None, "max": None, "count": 0}
    return {"p50": 1e3 * percentile(values, 50), "p99": 1e3 * percentile(values, 99),
            "mean": 1e3 * sum(values) / len(values), "max": 1e3 * max(values), "count": len(values)}


def inter_token_gaps(token_times: Sequence[Sequence[float]]) -> list[float]:
    return [b - a for times in token_times for a, b in zip(times, times[1:])]


def summarize_run(run: dict) -> dict:
    """Throughput, TTFT and ITL of one system's run, in tokens/s and milliseconds."""
    wall = run["wall_time_s"]
    ttft = [t for t in run["ttft_s"] if t is not None]
    e2e = [times[-1] for times in run["token_times_s"] if times]
    cpu, threads = run.get("cpu_time_s"), run.get("torch_num_threads")
    return {
        "wall_time_s": wall,
        "cpu_time_s": cpu,
        # CPU time over wall time x threads: well below 1 means the run was starved by other processes
        "cpu_utilization": cpu / wall / threads if cpu is not None and threads and wall > 0 else None,
        "num_requests": run["num_requests"],
        "num_output_tokens": run["num_output_tokens"],
        "num_generated_tokens": run["num_generated_tokens"],
        "output_tokens_per_s": run["num_output_tokens"] / wall if wall > 0 else None,
        "requests_per_s": run["num_requests"] / wall if wall > 0 else None,
        "ttft_ms": _summary_ms(ttft),
        "itl_ms": _summary_ms(inter_token_gaps(run["token_times_s"])),
        "e2e_latency_ms": _summary_ms(e2e),
        "load_time_s": run.get("load_time_s"),
        "torch_num_threads": run.get("torch_num_threads"),
        "options": run.get("options"),
        "peak_rss_mib": run.get("peak_rss_mib"),
        "ru_maxrss_mib": run.get("ru_maxrss_mib"),
        **({"breakdown": run["breakdown"]} if "breakdown" in run else {}),
    }


def token_agreement(a: Sequence[Sequence[int]], b: Sequence[Sequence[int]]) -> dict:
    """How far two systems' greedy outputs agree: requests identical end to end, and the share of
    tokens before each request's first disagreement (numerics differ slightly between the two)."""
    same = sum(list(x) == list(y) for x, y in zip(a, b))
    prefix = 0
    for x, y in zip(a, b):
        for u, v in zip(x, y):
            if u != v:
                break
            prefix += 1
    total = sum(min(len(x), len(y)) for x, y in zip(a, b))
    return {"identical_requests": same, "num_requests": len(a),
            "matching_prefix_token_fraction": prefix / total if total else None}
