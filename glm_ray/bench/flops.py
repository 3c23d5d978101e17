"""How close a decode step comes to the machine's matmul peak (and to its memory bandwidth).

`matmul_peak` times torch.matmul on square matrices. `token_flops` counts the matmul FLOPs one
decode token costs (2 per weight touched, plus attention over its context); `measure_decode_step`
times real engine steps of a full decode batch and divides. MTP layers are not run by the engine
and not counted; elementwise work (norms, RoPE, SiLU, softmax, sampling) is not counted either.
A batch-64 decode step of a MoE model reads every expert's weights for ~8 tokens each, so it is
bound by memory traffic long before FLOPs: `step_bytes` and `memory_bandwidth` give that roofline.
"""

from __future__ import annotations

import random
import statistics
import time
from pathlib import Path

from glm_ray.config import ModelConfig


def matmul_peak(dtype: str, n: int = 2048, repeats: int = 5, max_call_s: float = 2.0) -> dict:
    """Best-of-`repeats` GFLOP/s of an n x n x n torch.matmul, after one untimed call. Where one call
    would take longer than `max_call_s` (bf16 without AVX-512 BF16 / AMX runs a slow fallback at
    ~1 GFLOP/s), n is halved until it fits, and the size used is reported."""
    import torch

    torch_dtype = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(0)

    def operands(size):
        return (torch.randn(size, size, generator=gen).to(torch_dtype),
                torch.randn(size, size, generator=gen).to(torch_dtype))

    probe = min(n, 256)
    a, b = operands(probe)
    torch.matmul(a, b)
    start = time.perf_counter()
    torch.matmul(a, b)
    probe_s = time.perf_counter() - start
    size = n
    while size > probe and probe_s * (size / probe) ** 3 > max_call_s:
        size //= 2
    a, b = operands(size)
    out = torch.matmul(a, b)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.matmul(a, b, out=out)
        best = min(best, time.perf_counter() - start)
    return {"dtype": dtype, "n": size, "requested_n": n, "repeats": repeats, "best_s": best,
            "gflops": 2 * size**3 / best / 1e9}


def token_flops(config: ModelConfig, context_len: int) -> dict[str, int]:
    """Matmul FLOPs of one decode token whose query attends to `context_len` positions."""
    c, h = config, config.hidden_size
    num_layers = c.num_hidden_layers
    num_moe = len(c.moe_layers)
    expert = 3 * h * c.moe_intermediate_size  # gate, up, down
    return {
        "qkv_o_proj": 2 * num_layers * (h * (c.q_size + 2 * c.kv_size) + c.q_size * h),
        "dense_mlp": 2 * (num_layers - num_moe) * 3 * h * c.intermediate_size,
        "router": 2 * num_moe * h * c.n_routed_experts,
        "shared_experts": 2 * num_moe * c.n_shared_experts * expert,
        "routed_experts": 2 * num_moe * c.num_experts_per_tok * expert,
        "lm_head": 2 * h * c.vocab_size,
        "attention_qk_pv": 2 * 2 * num_layers * c.num_attention_heads * c.head_dim * context_len,
    }


def step_bytes(config: ModelConfig, contexts: list[int], itemsize: int,
               expert_itemsize: int | None = None) -> dict[str, float]:
    """Bytes one decode step must read: every weight it touches once (shared by the batch) plus each
    sequence's KV. Routed experts: the expected number of distinct experts a batch of B tokens hits
    under uniform routing, E * (1 - (1 - K/E)^B) per layer (all 32 of the small preset at B = 64),
    at `expert_itemsize` bytes a weight (default itemsize; 2 where a bf16 checkpoint's experts are
    held in bf16 and computed in fp32, model/loader.py)."""
    c, h = config, config.hidden_size
    num_layers, num_moe, batch = c.num_hidden_layers, len(c.moe_layers), len(contexts)
    expert = 3 * h * c.moe_intermediate_size
    distinct = c.n_routed_experts * (1 - (1 - c.num_experts_per_tok / c.n_routed_experts) ** batch)
    return {
        "dense_weights": itemsize * (num_layers * (h * (c.q_size + 2 * c.kv_size) + c.q_size * h)
                                     + (num_layers - num_moe) * 3 * h * c.intermediate_size
                                     + num_moe * c.n_shared_experts * expert + h * c.vocab_size),
        "router": 4 * num_moe * h * c.n_routed_experts,  # kept in fp32
        "routed_experts": (expert_itemsize or itemsize) * num_moe * distinct * expert,
        "kv_cache": itemsize * 2 * num_layers * c.kv_size * sum(contexts),
    }


def memory_bandwidth(size_mib: int = 512, repeats: int = 3) -> dict:
    """Best-of-`repeats` read bandwidth of a sum over a `size_mib` fp32 tensor, in GB/s."""
    import torch

    x = torch.ones(size_mib << 18)  # 4-byte elements
    x.sum()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - start)
    return {"size_mib": size_mib, "best_s": best, "gbps": x.numel() * 4 / best / 1e9}


class _TimedRunner:
    """Wraps the engine's ModelRunner to time `run` and note what each step held."""

    def __init__(self, runner):
        self.runner = runner
        self.steps: list[dict] = []

    def run(self, chunks, requests):
        start = time.perf_counter()
        result = self.runner.run(chunks, requests)
        self.steps.append({"run_s": time.perf_counter() - start, "num_tokens": sum(c.num_tokens for c in chunks),
                           "decode_contexts": [c.end for c in chunks if c.num_tokens == 1]})
        return result


def measure_decode_step(model_dir: str | Path, dtype: str = "float32", batch: int = 64, prompt_len: int = 32,
                        num_steps: int = 16, warmup_steps: int = 2, kv_cache_memory: int | None = None) -> dict:
    """Time `num_steps` engine steps in which all `batch` sequences decode one token each."""
    from glm_ray import LLM, SamplingParams
    from glm_ray.bench.offline import KV_CACHE_MEMORY

    llm = LLM(model=str(model_dir), dtype=dtype, max_num_seqs=batch,
              max_num_batched_tokens=max(2048, batch * prompt_len),
              kv_cache_memory=kv_cache_memory or KV_CACHE_MEMORY)
    engine = llm.engine
    vocab = engine.model_config.vocab_size
    rng = random.Random("glm-ray-bench/decode-step")
    params = SamplingParams(temperature=0, max_tokens=warmup_steps + num_steps + 4, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"decode-{i}", [rng.randrange(vocab - 32) for _ in range(prompt_len)], params)
    timed = _TimedRunner(engine.runner)
    engine.runner = timed
    step_times = []
    while engine.has_unfinished() and len(step_times) < warmup_steps + num_steps:
        start = time.perf_counter()
        engine.step()
        elapsed = time.perf_counter() - start
        if timed.steps and len(timed.steps[-1]["decode_contexts"]) == batch == timed.steps[-1]["num_tokens"]:
            step_times.append((elapsed, timed.steps[-1]))
    step_times = step_times[warmup_steps:]
    if not step_times:
        raise RuntimeError(f"no engine step decoded all {batch} sequences at once; nothing to measure")

    config = engine.model_config
    per_step = [sum(sum(token_flops(config, ctx).values()) for ctx in s["decode_contexts"]) for _, s in step_times]
    breakdown: dict[str, int] = {}
    for ctx in step_times[0][1]["decode_contexts"]:
        for name, value in token_flops(config, ctx).items():
            breakdown[name] = breakdown.get(name, 0) + value
    flops = statistics.mean(per_step)
    first = step_times[0][1]["decode_contexts"]
    held = getattr(engine.experts, "layers", None)  # in-process experts: as held, which may be narrower
    expert_itemsize = next(iter(held.values())).w13.element_size() if held else None
    traffic = step_bytes(config, first, engine.dtype.itemsize, expert_itemsize)
    step_s = statistics.median(t for t, _ in step_times)
    run_s = statistics.median(s["run_s"] for _, s in step_times)
    return {
        "dtype": dtype, "batch": batch, "prompt_len": prompt_len, "num_timed_steps": len(step_times),
        "context_len_range": [min(step_times[0][1]["decode_contexts"]), max(step_times[-1][1]["decode_contexts"])],
        "flops_per_token": flops / batch,
        "flops_per_step": flops,
        "flops_breakdown_first_step": breakdown,
        "step_time_ms": {"median": 1e3 * step_s, "min": 1e3 * min(t for t, _ in step_times)},
        "model_runner_time_ms": {"median": 1e3 * run_s},  # forward + logits + sampling, no scheduling
        "achieved_gflops": flops / step_s / 1e9,
        "achieved_gflops_model_runner": flops / run_s / 1e9,
        "bytes_per_step_first_step": traffic,
        "achieved_read_gbps": sum(traffic.values()) / step_s / 1e9,
    }


def run_flops(model_dir: str | Path, dtype: str = "float32", batch: int = 64, matmul_size: int = 2048,
              kv_cache_memory: int | None = None, bandwidth_mib: int = 512) -> dict:
    """Child-process entry: both matmul peaks and the decode-step figure, with their ratio."""
    import torch

    peaks = {name: matmul_peak(name, matmul_size) for name in ("float32", "bfloat16")}
    bandwidth = memory_bandwidth(bandwidth_mib)
    decode = measure_decode_step(model_dir, dtype, batch, kv_cache_memory=kv_cache_memory)
    return {
        "torch_num_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "matmul_peak": peaks,
        "decode_step": decode,
        "decode_fraction_of_peak": decode["achieved_gflops"] / peaks[dtype]["gflops"],
        "decode_fraction_of_peak_model_runner": decode["achieved_gflops_model_runner"] / peaks[dtype]["gflops"],
        "memory_bandwidth": bandwidth,
        "decode_fraction_of_bandwidth": decode["achieved_read_gbps"] / bandwidth["gbps"],
    }
