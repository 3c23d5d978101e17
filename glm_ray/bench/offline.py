"""The engine under test: one `LLM.generate` call over the whole workload, in this process.

Every request arrives at once (offline mode). TTFT is `first_token_time - arrival_time` and the
token times are the engine's own `metrics.token_times`, all on `time.monotonic()`. A short warmup
generate runs first, untimed. Meant to run in a child process (`isolate.run_in_child`).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from glm_ray.bench.workloads import Workload, warmup_workload

MAX_NUM_BATCHED_TOKENS = 2048
KV_CACHE_MEMORY = 2 << 30


def engine_options(workload: Workload, dtype: str, kv_cache_memory: int = KV_CACHE_MEMORY,
                   decode_attention: str = "torch") -> dict:
    return dict(dtype=dtype, max_num_seqs=workload.max_num_seqs, max_num_batched_tokens=MAX_NUM_BATCHED_TOKENS,
                kv_cache_memory=kv_cache_memory, decode_attention=decode_attention)


def _requests(workload: Workload):
    from glm_ray import SamplingParams

    prompts = [{"prompt_token_ids": list(p)} for p in workload.prompts]
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in workload.output_lens]
    return prompts, params


def run_engine(model_dir: str | Path, workload: Workload, dtype: str = "float32", progress: bool = False,
               kv_cache_memory: int = KV_CACHE_MEMORY, decode_attention: str = "torch") -> dict:
    """Generate the workload with the engine; the raw run that `stats.summarize_run` reads."""
    import torch

    from glm_ray import LLM

    start = time.monotonic()
    options = engine_options(workload, dtype, kv_cache_memory, decode_attention)
    llm = LLM(model=str(model_dir), **options)
    load_time = time.monotonic() - start
    llm.generate(*_requests(warmup_workload(llm.engine.model_config.vocab_size)))

    prompts, params = _requests(workload)
    engine = llm.engine
    engine.step_stats.update(steps=0, step_s=0.0, batched_tokens=0)
    engine.experts.compute_s = 0.0
    cpu0, t0 = time.process_time(), time.monotonic()
    outputs = llm.generate(prompts, params, use_tqdm=progress and sys.stderr.isatty())
    wall, cpu = time.monotonic() - t0, time.process_time() - cpu0

    token_ids = [list(o.outputs[0].token_ids) for o in outputs]
    for ids, want in zip(token_ids, workload.output_lens):
        if len(ids) != want:
            raise RuntimeError(f"the engine returned {len(ids)} tokens for a request that asked for {want} "
                               "with ignore_eos: the run does not measure the workload")
    return {
        "system": "engine",
        "options": options,
        "torch_num_threads": torch.get_num_threads(),
        "load_time_s": load_time,
        "wall_time_s": wall,
        "cpu_time_s": cpu,  # all threads; well under wall x threads means the process was starved
        "num_requests": len(outputs),
        "num_output_tokens": sum(map(len, token_ids)),
        "num_generated_tokens": sum(map(len, token_ids)),
        "ttft_s": [o.metrics.first_token_time - o.metrics.arrival_time for o in outputs],
        "token_times_s": [[t - t0 for t in o.metrics.token_times] for o in outputs],
        "token_ids": token_ids,
        "breakdown": _breakdown(engine.step_stats, engine.experts.compute_s),
    }


def _breakdown(step_stats: dict, expert_s: float) -> dict:
    """Per-step milliseconds of the in-process engine: routed-expert compute and everything else."""
    steps = max(step_stats["steps"], 1)
    return {"steps": steps, "step_ms": 1e3 * step_stats["step_s"] / steps,
            "expert_compute_ms": 1e3 * expert_s / steps,
            "attention_compute_ms": 1e3 * (step_stats["step_s"] - expert_s) / steps,
            "batched_tokens_per_step": step_stats["batched_tokens"] / steps}
