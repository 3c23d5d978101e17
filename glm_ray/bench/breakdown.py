"""`glm-ray bench --breakdown`: where the served path's throughput goes, stage by stage.

One workload, one invocation, the same engine options everywhere; each stage adds one part of the
path between the engine and the client:

1. `engine`: the in-process engine (`LLM.generate`), whole requests.
2. `colocated`: an attention replica with every routed expert inside it (`--expert-groups 0`),
   called through its Serve handle, whole requests.
3. `remote`: an attention replica with G remote expert groups over gRPC (the default app), same calls.
4. `http-whole`: the same app through Serve's HTTP proxy and the ingress, `/v1/completions` with
   `stream: false`, `concurrency` clients.
5. `http-stream`: the same with `stream: true` (SSE), as `glm-ray bench --url` sends it.
6. `colocated-http-stream`: stage 5 against the colocated app.

Per stage: output tokens/s, and the CPU each process burned per generated token (from /proc, by
role: the bench client, each deployment's replicas, Serve's proxy and controller, Ray's daemons),
plus how busy the machine's cores were. Every stage draws its prompts with other token ids (same
lengths), so none finds an earlier stage's prompts in the prefix cache. Stage 1 runs in a child
process; stages 2-6 in another, on one local Ray cluster (the colocated app first, then the
disaggregated one), so the cluster's start-up is in no stage's figures.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from glm_ray.bench import proc_cpu, stats
from glm_ray.bench.workloads import NUM_SPECIAL_TOKENS, Workload

STAGES = {
    "engine": "engine alone (in-process LLM), whole requests",
    "colocated": "attention replica, experts inside it (--expert-groups 0), Serve handle, whole requests",
    "remote": "attention replica + {G} expert groups over gRPC, Serve handle, whole requests",
    "http-whole": "+ HTTP ({P}) and the ingress: /v1/completions, stream false, {C} clients",
    "http-stream": "+ streamed: /v1/completions over SSE, {C} clients",
    "colocated-http-stream": "colocated app, /v1/completions over SSE, {C} clients",
}


def stage_workload(workload: Workload, stage: int, vocab_size: int) -> Workload:
    """The same request shapes with every prompt token shifted by a stage-dependent offset: no stage
    meets another's prompts in the prefix cache, and the work per stage is the same."""
    span = vocab_size - NUM_SPECIAL_TOKENS
    shift = (stage * 7919) % span
    prompts = tuple(tuple((t + shift) % span for t in p) for p in workload.prompts)
    return replace(workload, prompts=prompts)


def describe(stage: str, groups: int, concurrency: int, http_proxy: str) -> str:
    proxy = "HAProxy straight to the ingress replica" if http_proxy == "haproxy" else "Serve's HTTP proxy"
    return STAGES[stage].format(G=groups, C=concurrency, P=proxy)


def _cpu_entry(by_role: dict[str, float], tokens: int, wall_s: float) -> dict:
    total = sum(by_role.values())
    cores = os.cpu_count() or 1
    return {
        "cpu_s": by_role,
        "cpu_ms_per_token": {role: 1e3 * s / max(tokens, 1) for role, s in by_role.items()},
        "cpu_ms_per_token_total": 1e3 * total / max(tokens, 1),
        "cores_busy": total / max(wall_s, 1e-9),  # of os.cpu_count()
        "cores": cores,
    }


def run_engine_stage(model_dir: str | Path, workload: Workload, dtype: str, kv_cache_memory: int) -> dict:
    """Stage 1 in this (child) process; its CPU is the process's own."""
    from glm_ray.bench.offline import run_engine

    run = run_engine(model_dir, workload, dtype, kv_cache_memory=kv_cache_memory)
    summary = stats.summarize_run(run)
    summary["cpu"] = _cpu_entry({"engine process": run["cpu_time_s"]}, run["num_generated_tokens"],
                                run["wall_time_s"])
    return {"summary": summary, "token_ids": run["token_ids"]}


def _measured(fn):
    """(run, cpu by role) of fn(), with /proc snapshots around it."""
    before = proc_cpu.snapshot()
    run = fn()
    by_role = proc_cpu.cpu_by_role(before, proc_cpu.snapshot())
    return run, by_role


def run_cluster_stages(model_dir: str | Path, workload: Workload, dtype: str, kv_cache_memory: int,
                       groups: int, concurrency: int, http_port: int, vocab_size: int,
                       stages: list[str], attention_cpus: float | None = None, http_proxy: str = "haproxy") -> dict:
    """Stages 2-6 on one local Ray cluster, started as `glm-ray serve` starts one (`http_proxy`);
    {stage: {"summary", "token_ids"}}."""
    import ray
    from ray import serve

    from glm_ray.bench.distributed import run_through
    from glm_ray.bench.offline import MAX_NUM_BATCHED_TOKENS
    from glm_ray.bench.online import run_online, summarize_online
    from glm_ray.bench.workloads import warmup_workload
    from glm_ray.serving import local
    from glm_ray.serving.config import Resources, ServeConfig
    from glm_ray.serving.serve_file import APP_NAME

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.update(local.proxy_environment(http_proxy))
    ray.init(include_dashboard=False, num_cpus=max(os.cpu_count() or 1, 4), log_to_driver=False)
    url = f"http://127.0.0.1:{http_port}"
    out: dict = {}
    try:
        for expert_groups in (0, groups):
            mine = [s for s in stages if (s.startswith("colocated") == (expert_groups == 0))]
            if not mine:
                continue
            cfg = ServeConfig(model=str(model_dir), expert_groups=expert_groups, dtype=dtype, http_port=http_port,
                              grpc_enabled=False, kv_cache_memory=kv_cache_memory,
                              max_num_seqs=workload.max_num_seqs, max_num_batched_tokens=MAX_NUM_BATCHED_TOKENS,
                              **({"attention_resources": Resources(num_cpus=attention_cpus)} if attention_cpus
                                 else {}))
            local.start(cfg)
            attention = serve.get_deployment_handle("AttentionReplica", app_name=APP_NAME).options(stream=True)
            warm = warmup_workload(vocab_size)
            run_through(attention, warm)
            run_online(url, warm, vocab_size=vocab_size, warmup=False)  # so no stage times a first request
            for name in mine:
                stage_load = stage_workload(workload, list(STAGES).index(name), vocab_size)
                if name in ("colocated", "remote"):
                    run, by_role = _measured(lambda: run_through(attention, stage_load))
                    summary = stats.summarize_run(run)
                else:
                    streamed = name.endswith("stream")
                    run, by_role = _measured(lambda: run_online(url, stage_load, concurrency=concurrency,
                                                                vocab_size=vocab_size, stream=streamed,
                                                                warmup=False))
                    summary = summarize_online(run)
                summary["cpu"] = _cpu_entry(by_role, run["num_generated_tokens"], run["wall_time_s"])
                out[name] = {"summary": summary, "token_ids": run["token_ids"]}
            local.stop(started_ray=False)
    finally:
        serve.shutdown()
        ray.shutdown()
    return out


def format_breakdown(stages: dict, groups: int, concurrency: int, http_proxy: str) -> str:
    """The table: tok/s, vs the engine, CPU ms per generated token in all and by the roles that
    burned the most, how many cores were busy."""
    lines = ["stage                   tok/s   vs engine  cores busy  CPU ms/token (total: by process)"]
    engine = stages.get("engine", {}).get("summary", {}).get("output_tokens_per_s")
    for name, entry in stages.items():
        s = entry["summary"]
        cpu = s["cpu"]
        tps = s["output_tokens_per_s"]
        ratio = f"{tps / engine:.2f}x" if engine else "-"
        roles = ", ".join(f"{role} {ms:.2f}" for role, ms in list(cpu["cpu_ms_per_token"].items())[:6])
        lines.append(f"{name:22s} {tps:7.1f}  {ratio:>9s}  {cpu['cores_busy']:4.2f}/{cpu['cores']}    "
                     f"{cpu['cpu_ms_per_token_total']:.2f}: {roles}")
    lines.append("")
    for name in stages:
        lines.append(f"  {name}: {describe(name, groups, concurrency, http_proxy)}")
    return "\n".join(lines)
