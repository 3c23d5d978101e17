"""`glm-ray bench --rebalance`: a skewed routing before, during and after a live rebalance.

The disaggregated app on a local Ray cluster (G expert groups, R redundant slots each) with a
checkpoint whose routing favours a few experts of group 0 (`hot_experts`). The same workload runs
three times through the attention deployment's handle: before any rebalance, with a rebalance
asked for while it runs, and after the new placement is in force. Each run reports throughput,
balancedness over the groups (measured by the router over that run's placement version) and per
engine step the slowest group's expert compute (summed over MoE layers: the time a step waits for
its straggler). The run with the rebalance also reports the longest engine step between the
request and the moment every attention replica switched, against the median step of the minute
around it (the issue's bar: at most 1.5x), for decode steps (no prompt tokens: their time depends
on the batch alone) apart from steps that carry prefill (their time depends on how many prompt
tokens they carry: workload D admits its second 64 requests' prompts in one step mid-run).

Meant to run in a child process (`isolate.run_in_child`), as the other cluster benchmarks.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from pathlib import Path

from glm_ray.bench.distributed import _breakdown, deploy_app, run_through, workload_vocab
from glm_ray.bench.offline import MAX_NUM_BATCHED_TOKENS
from glm_ray.bench.workloads import Workload, warmup_workload

APP = "glm-ray-bench-rebalance"


def skewed_model(preset: str, hot_experts: int) -> dict:
    """The preset with its first `hot_experts` experts always routed to (cached); returns {"path"}."""
    from glm_ray.model.default import FORMAT_VERSION, cache_root
    from glm_ray.model.synthetic import make_model

    path = cache_root() / "models" / f"{preset}-hot{hot_experts}-seed0-v{FORMAT_VERSION}"
    if not (path / "config.json").is_file():
        make_model(path, preset, seed=0, hot_experts={e: 1.0 for e in range(hot_experts)})
    return {"path": str(path)}


def run_rebalance(model_dir: str | Path, workload: Workload, dtype: str = "float32", groups: int = 4,
                  redundant_experts: int = 2, kv_cache_memory: int = 1 << 30,
                  attention_cpus: float | None = None) -> dict:
    import ray
    from ray import serve

    from glm_ray.serving.config import Resources, ServeConfig

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(include_dashboard=False, num_cpus=8, log_to_driver=False)
    try:
        serve.start(http_options={"location": "NoServer"})
        cfg = ServeConfig(model=str(model_dir), expert_groups=groups, redundant_experts=redundant_experts,
                          rebalance_threshold=0, dtype=dtype, kv_cache_memory=kv_cache_memory,
                          max_num_seqs=workload.max_num_seqs, max_num_batched_tokens=MAX_NUM_BATCHED_TOKENS,
                          snapshot_refresh_s=0.5, heartbeat_interval_s=0.3,
                          attention_resources=Resources(num_cpus=attention_cpus or os.cpu_count() or 1))
        router, attention, handle = deploy_app(cfg, APP)
        run_through(handle, warmup_workload(workload_vocab(model_dir)))

        phases = {"before": _measured_run(handle, attention, router, workload, version=0)}

        # during: the same workload, a rebalance asked for once it is well under way
        box: dict = {}
        runner = threading.Thread(target=lambda: box.update(run=run_through(handle, workload)))
        attention.dispatch_stats.remote().result()
        runner.start()
        time.sleep(0.25 * phases["before"]["wall_time_s"])
        asked = time.monotonic()
        record = router.rebalance.remote("bench").result()
        if not record["changed"]:
            runner.join()
            raise RuntimeError(f"the rebalance changed nothing: {record}")
        switched = _wait_switched(router, record["version"])
        runner.join()
        during = _summary(box["run"], attention.dispatch_stats.remote().result())
        during |= _steps_around(attention.step_times.remote().result(), asked, switched, workload.max_num_seqs)
        status = router.status.remote().result()["rebalance"]
        during["rebalance"] = {**status["last"], "asked_to_switched_s": switched - asked}
        phases["during"] = during

        phases["after"] = _measured_run(handle, attention, router, workload, version=record["version"])
    finally:
        serve.shutdown()
        ray.shutdown()
    return {"system": f"distributed (G={groups}, R={redundant_experts})", "options": cfg.model_dump(
        include={"expert_groups", "redundant_experts", "dtype", "kv_cache_memory", "max_num_seqs",
                 "max_num_batched_tokens", "attention_resources"}), "phases": phases, "proposal": record}


def _measured_run(handle, attention, router, workload: Workload, version: int) -> dict:
    attention.dispatch_stats.remote().result()  # reset: time only this run
    run = run_through(handle, workload)
    out = _summary(run, attention.dispatch_stats.remote().result())
    out["balancedness"] = _balancedness(router, version)
    return out


def _summary(run: dict, stats: dict) -> dict:
    b = _breakdown(stats)
    return {"output_tokens_per_s": run["num_output_tokens"] / run["wall_time_s"], "wall_time_s": run["wall_time_s"],
            "num_output_tokens": run["num_output_tokens"], "step_ms": b["step_ms"],
            "slowest_group_ms": b["slowest_group_ms"], "expert_compute_ms": b["expert_compute_ms"],
            "dispatch_wait_ms": b["dispatch_wait_ms"], "token_ids": run["token_ids"]}


def _balancedness(router, version: int, wait_s: float = 10.0) -> dict:
    """The router's balancedness over `version`'s group counts, once this run's reports arrived
    (attention replicas report with each table refresh)."""
    time.sleep(1.5)
    deadline = time.monotonic() + wait_s
    while True:
        status = router.status.remote().result()
        if status["rebalance"]["version"] == version or time.monotonic() > deadline:
            b = status["balancedness"]
            return {"min": b["min"], "mean": b["mean"], "layers": b["layers"]}
        time.sleep(0.3)


def _wait_switched(router, version: int, timeout_s: float = 600.0) -> float:
    """When every attention replica runs `version` (the router's record says so), to within the
    0.25 s between polls: the router's status sums its whole window, and asking it more often
    would take CPU from the steps being measured."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        last = router.status.remote().result()["rebalance"]["last"]
        if last["state"] == "abandoned":
            raise RuntimeError(f"the rebalance was abandoned: {last['error']}")
        if last["state"] == "published" and last.get("switched"):
            return time.monotonic()
        time.sleep(0.25)
    raise RuntimeError(f"placement version {version} not in force after {timeout_s:.0f} s")


def _steps_around(times: list[tuple[float, float, int]], asked: float, switched: float, max_seqs: int) -> dict:
    """Decode steps (at most one token a sequence) that overlapped [asked, switched]: the longest
    against the median decode step of the minute around it; steps carrying prefill counted apart."""
    def decode(tokens):
        return tokens <= max_seqs

    during = [s for end, s, n in times if end >= asked and end - s <= switched and decode(n)]
    around = [s for end, s, n in times if asked - 30.0 <= end <= switched + 30.0 and decode(n)]
    prefill = [s for end, s, n in times if end >= asked and end - s <= switched and not decode(n)]
    median = statistics.median(around) if around else None
    longest = max(during) if during else None
    timeline = [(round(end - asked, 3), round(1e3 * s, 1), n) for end, s, n in times
                if asked - 2.0 <= end <= switched + 2.0]
    return {"steps_during_rebalance": len(during), "longest_step_ms": None if longest is None else 1e3 * longest,
            "prefill_steps_during_rebalance_ms": [round(1e3 * s, 1) for s in prefill],
            "step_timeline": timeline,  # (seconds since the request, step ms, batched tokens), 2 s either side
            "median_step_ms_around": None if median is None else 1e3 * median,
            "longest_vs_median": None if not (longest and median) else longest / median}


def format_rebalance(report: dict) -> str:
    p = report["phases"]
    lines = [f"{report['system']}, {report['proposal']['slots_per_group']} slots per group; rebalance "
             f"predicted balancedness {report['proposal']['predicted_before']['min']:.3f} -> "
             f"{report['proposal']['predicted_after']['min']:.3f}",
             f"{'run':<8} {'tok/s':>8} {'balancedness min/mean':>22} {'step ms':>8} {'slowest group ms':>17}"]
    for name in ("before", "during", "after"):
        r = p[name]
        b = r.get("balancedness") or {}
        bal = f"{b['min']:.3f} / {b['mean']:.3f}" if b.get("min") is not None else "-"
        lines.append(f"{name:<8} {r['output_tokens_per_s']:>8.1f} {bal:>22} {r['step_ms']:>8.1f} "
                     f"{r['slowest_group_ms']:>17.1f}")
    d = p["during"]
    if d.get("longest_step_ms") is not None:
        prefill = d["prefill_steps_during_rebalance_ms"]
        lines.append(f"during the rebalance ({d['rebalance']['asked_to_switched_s']:.1f} s from the request until "
                     f"every attention replica switched, {d['steps_during_rebalance']} decode steps): longest "
                     f"decode step {d['longest_step_ms']:.1f} ms = {d['longest_vs_median']:.2f}x the median decode "
                     f"step of the minute around it ({d['median_step_ms_around']:.1f} ms; bar: <= 1.5x)"
                     + (f"; steps with prefill meanwhile: {', '.join(f'{s:.0f}' for s in prefill)} ms" if prefill
                        else ""))
    same = sum(a == b for a, b in zip(p["before"]["token_ids"], p["after"]["token_ids"]))
    lines.append(f"greedy outputs identical before and after: {same}/{len(p['before']['token_ids'])}; during: "
                 f"{sum(a == b for a, b in zip(p['before']['token_ids'], p['during']['token_ids']))}"
                 f"/{len(p['before']['token_ids'])}")
    return "\n".join(lines)
