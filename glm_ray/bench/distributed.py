"""The disaggregated app under test: a local Ray cluster with Serve, the workload sent through the
attention deployment's handle (whole requests, or streamed token by token), and a per-step time
breakdown from the attention replica.

Meant to run in a child process (`isolate.run_in_child`) so the cluster, like every measured
system, lives and dies with it. All requests arrive at once, as in the offline engine run.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

from glm_ray.bench.offline import MAX_NUM_BATCHED_TOKENS
from glm_ray.bench.workloads import Workload, warmup_workload

APP = "glm-ray-bench"


def _breakdown(stats: dict, num_steps_hint: int | None = None) -> dict:
    """Per-step milliseconds: attention side compute, waiting on expert replies, (de)serialisation,
    and the expert servers' own compute (summed over groups, which run concurrently)."""
    steps = max(int(stats.get("engine_steps", 0)), 1)
    step_s = stats.get("engine_step_s", 0.0)
    wait_s, ser_s = stats.get("wait_s", 0.0), stats.get("serialize_s", 0.0)
    return {
        "steps": steps,
        "step_ms": 1e3 * step_s / steps,
        "attention_compute_ms": 1e3 * max(step_s - wait_s - ser_s, 0.0) / steps,
        "dispatch_wait_ms": 1e3 * wait_s / steps,
        "serialisation_ms": 1e3 * ser_s / steps,
        "expert_compute_ms": 1e3 * stats.get("server_compute_s", 0.0) / steps,
        "slowest_group_ms": 1e3 * stats.get("slowest_group_s", 0.0) / steps,
        "rpc_calls": stats.get("calls", 0),
        "retries": stats.get("retries", 0),
        "bytes_sent": stats.get("bytes_sent", 0),
        "bytes_received": stats.get("bytes_received", 0),
        "batched_tokens_per_step": stats.get("engine_batched_tokens", 0) / steps,
    }


async def _stream_all(handle, workload: Workload, t0: float, stream: bool = True):
    """(token times, token ids) per request, all sent at t0. stream=False asks for whole requests
    and takes the token times the engine recorded (the same host's monotonic clock)."""
    async def one(i, prompt, n):
        req = {"request_id": f"bench-{i}", "prompt_token_ids": list(prompt), "stream": stream,
               "sampling_params": {"temperature": 0.0, "max_tokens": n, "ignore_eos": True}}
        times, ids = [], []
        async for delta in handle.generate.remote(req):
            ids += delta["token_ids"]
            if stream:
                times += [time.monotonic() - t0] * len(delta["token_ids"])
            else:
                times = [t - t0 for t in delta["metrics"]["token_times"]]
        return times, ids

    return await asyncio.gather(*(one(i, p, n) for i, (p, n) in enumerate(zip(workload.prompts,
                                                                                 workload.output_lens))))


def run_distributed(model_dir: str | Path, workload: Workload, dtype: str = "float32", groups: int = 2,
                    attention_replicas: int = 1, kv_cache_memory: int = 1 << 30,
                    attention_cpus: float | None = None, stream: bool = False) -> dict:
    """`attention_cpus`: CPUs reserved by (and attention threads of) the attention replica; default
    every core: with one attention replica it computes while the expert groups wait, and the
    other way round, so they do not compete for cores. `stream`: every token crosses to the
    client as it is made (one Serve message per request and step); default whole requests, one
    message each, as the offline engine run returns them."""
    import ray
    from ray import serve

    from glm_ray.serving.config import Resources, ServeConfig

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    start = time.monotonic()
    ray.init(include_dashboard=False, num_cpus=8, log_to_driver=False)
    try:
        serve.start(http_options={"location": "NoServer"})
        cfg = ServeConfig(model=str(model_dir), expert_groups=groups, attention_replicas=attention_replicas,
                          dtype=dtype, kv_cache_memory=kv_cache_memory, max_num_seqs=workload.max_num_seqs,
                          max_num_batched_tokens=MAX_NUM_BATCHED_TOKENS,
                          attention_resources=Resources(num_cpus=attention_cpus or os.cpu_count() or 1))
        router, attention, handle = deploy_app(cfg, APP)
        load_time = time.monotonic() - start

        warm = warmup_workload(workload_vocab(model_dir))
        run_through(handle, warm, stream)
        attention.dispatch_stats.remote().result()  # reset the counters: time only the run

        run = run_through(handle, workload, stream)
        stats = attention.dispatch_stats.remote().result()
    finally:
        serve.shutdown()
        ray.shutdown()
    return {
        "system": f"distributed (G={groups}, N={attention_replicas})",
        "options": cfg.model_dump(include={"expert_groups", "attention_replicas", "dtype", "kv_cache_memory",
                                           "max_num_seqs", "max_num_batched_tokens", "microbatches",
                                           "attention_resources", "expert_resources"}) | {"streaming": stream},
        "load_time_s": load_time,
        **run,
        "breakdown": _breakdown(stats),
    }


def deploy_app(cfg, app: str) -> tuple:
    """`build_app(cfg)` on the running Serve, without HTTP, once every expert group has a replica:
    (router handle, attention handle, the attention handle for streaming calls)."""
    from ray import serve

    from glm_ray.serving.app import build_app

    serve.run(build_app(cfg), name=app, route_prefix=None)
    router = serve.get_deployment_handle("ExpertRouter", app_name=app)
    while router.status.remote().result()["missing_groups"]:
        time.sleep(0.2)
    attention = serve.get_deployment_handle("AttentionReplica", app_name=app)
    return router, attention, attention.options(stream=True)


def run_through(handle, workload: Workload, stream: bool = False) -> dict:
    """The workload through an attention deployment's streaming handle, all sent at once: the raw
    run `stats.summarize_run` reads. Raises if a request got other than the tokens it asked for."""
    t0 = time.monotonic()
    results = asyncio.run(_stream_all(handle, workload, t0, stream))
    wall = time.monotonic() - t0
    token_ids = [ids for _, ids in results]
    for ids, want in zip(token_ids, workload.output_lens):
        if len(ids) != want:
            raise RuntimeError(f"the attention replica returned {len(ids)} tokens for a request asking {want}")
    return {
        "wall_time_s": wall,
        "num_requests": len(results),
        "num_output_tokens": sum(map(len, token_ids)),
        "num_generated_tokens": sum(map(len, token_ids)),
        "ttft_s": [times[0] if times else None for times, _ in results],
        "token_times_s": [times for times, _ in results],
        "token_ids": token_ids,
    }


def workload_vocab(model_dir) -> int:
    from glm_ray.config import load_model_config

    return load_model_config(model_dir).vocab_size
