"""`python -m glm_ray.bench.gpu`: the GPU measurements of one lent machine, as one JSON report.

1. `peak`: a large bf16 matmul, the dense peak the MoE figures are read against.
2. `moe_layer`: the routed experts of one MoE layer at GLM-4.5-Air's shapes (hidden 4096, expert
   width 1408, 128 experts, top-8) for 64 / 512 / 4096 / 16384 tokens, per backend: `torch`
   (sort + grouped GEMM), `deepspeed` (inference-v2 kernels; the exact error when they cannot
   load or run), and `looped` (one matmul pair per expert, the plain path). Time and TFLOP/s.
3. `engine`: a reduced-depth GLM-4.5-Air-shaped model (4 layers, random bf16 weights written by
   make_model on this machine, since ~15 GB cannot travel) in the in-process engine, 256
   concurrent requests: output tokens/s, then a second run timed per part (attention and the
   rest / routed experts / sampling; timing synchronizes the GPU, so it runs apart).
4. `disaggregated`: the same model and workload with the routed experts in two expert servers
   on the same GPU, reached over gRPC on loopback: what the wire costs on a GPU.

Nothing needs Ray. `--device cpu` runs every section on toy shapes in seconds: the smoke test
that the script works before a device call is spent on it.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from glm_ray.device import synchronize

AIR = dict(hidden=4096, intermediate=1408, experts=128, top_k=8)
SMOKE = dict(hidden=256, intermediate=128, experts=16, top_k=8)


def _timed(fn, device: torch.device, iters: int, warmup: int = 2) -> float:
    """Mean seconds per call after warm-up."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / iters


def measure_peak(device: torch.device, n: int) -> dict:
    dtype = torch.bfloat16
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    s = _timed(lambda: a @ b, device, iters=10 if device.type == "cuda" else 2, warmup=3 if device.type == "cuda" else 1)
    return {"n": n, "dtype": "bfloat16", "seconds": s, "tflops": 2 * n**3 / s / 1e12}


def _routing(tokens: int, experts: int, top_k: int, device: torch.device, gen: torch.Generator):
    """Top-k of random sigmoid scores: every expert used about equally, as a balanced router would."""
    scores = torch.rand(tokens, experts, generator=gen).to(device)
    weights, ids = scores.topk(top_k, dim=-1)
    return ids, (weights / weights.sum(-1, keepdim=True)).float()


def measure_moe_layer(device: torch.device, shape: dict, token_counts: list[int]) -> dict:
    from glm_ray.experts.compute import ExpertCompute, looped_experts, sorted_moe, torch_grouped_swiglu
    from glm_ray.experts.deepspeed_moe import DeepSpeedUnavailable, load_deepspeed
    from glm_ray.experts.local import ExpertWeights

    h, i, e, k = shape["hidden"], shape["intermediate"], shape["experts"], shape["top_k"]
    dtype = torch.bfloat16
    gen = torch.Generator().manual_seed(0)
    held = ExpertWeights(range(e), (torch.randn(e, 2 * i, h, generator=gen) / h**0.5).to(device, dtype),
                         (torch.randn(e, h, i, generator=gen) / i**0.5).to(device, dtype), e).to_slots_on(device)

    def looped(x, ids, w, held, all_held=False):
        return sorted_moe(x, ids, w, e, lambda rows, counts: looped_experts(rows, counts, held.w13, held.w2))

    backends = {"torch": ExpertCompute("torch", torch_grouped_swiglu), "looped": ExpertCompute("looped", looped)}
    report: dict = {"shape": shape, "dtype": "bfloat16", "results": [], "unavailable": {}}
    try:
        backends["deepspeed"] = load_deepspeed(device)
    except DeepSpeedUnavailable as why:
        report["unavailable"]["deepspeed"] = str(why)
    for tokens in token_counts:
        x = torch.randn(tokens, h, generator=gen).to(device, dtype)
        ids, w = _routing(tokens, e, k, device, gen)
        want = None
        flops = 6 * tokens * k * h * i  # per pair: [H]x[H,2I] and [I]x[I,H], 2 flops a multiply-add
        for name, compute in backends.items():
            try:
                out = compute(x, ids, w, held, all_held=True)
                want = out if want is None else want
                err = float((out - want).abs().max() / want.abs().max())
                iters = max(2, min(50, int(2e11 / flops))) if device.type == "cuda" else 1
                s = _timed(lambda: compute(x, ids, w, held, all_held=True), device, iters=iters, warmup=1)
                report["results"].append({"backend": name, "tokens": tokens, "seconds": s, "tflops": flops / s / 1e12,
                                          "max_rel_diff_vs_torch": err})
            except Exception as ex:  # noqa: BLE001 - a report, not a crash: say what failed
                report["results"].append({"backend": name, "tokens": tokens, "error": f"{type(ex).__name__}: {ex}"})
    return report


def make_air_model(out: Path, layers: int, smoke: bool) -> tuple[Path, float]:
    from glm_ray.model.known_configs import GLM_4_5_AIR
    from glm_ray.model.synthetic import make_model

    keep = ("hidden_size", "intermediate_size", "moe_intermediate_size", "n_routed_experts", "num_experts_per_tok",
            "num_attention_heads", "num_key_value_heads", "head_dim", "partial_rotary_factor", "use_qk_norm",
            "first_k_dense_replace", "vocab_size", "n_shared_experts", "routed_scaling_factor")
    overrides = {key: GLM_4_5_AIR[key] for key in keep if key in GLM_4_5_AIR}
    overrides.update(num_hidden_layers=layers, max_position_embeddings=4096)
    if smoke:
        overrides.update(hidden_size=256, intermediate_size=512, moe_intermediate_size=128, n_routed_experts=16,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=64, vocab_size=2048)
    start = time.perf_counter()
    make_model(out, "small", overrides=overrides, dtype="bfloat16")
    return out, time.perf_counter() - start


class _Timed:
    """Wraps an expert backend or the sampler: synchronized seconds spent inside."""

    def __init__(self, inner, device):
        self.inner, self.device, self.seconds = inner, device, 0.0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def _time(self, fn, *args, **kwargs):
        synchronize(self.device)
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        synchronize(self.device)
        self.seconds += time.perf_counter() - t0
        return out

    def forward(self, *args):
        return self._time(self.inner.forward, *args)

    def submit(self, *args):
        from glm_ray.experts.backend import Done

        return Done(self._time(lambda: self.inner.submit(*args).result()))

    def begin_step(self):
        self.inner.begin_step()

    def __call__(self, *args):
        return self._time(self.inner, *args)


def run_engine(model_dir: Path, device: torch.device, requests: int, prompt_len: int, output_len: int,
               experts=None, breakdown: bool = True) -> dict:
    from glm_ray.engine.config import EngineOptions
    from glm_ray.engine.llm_engine import LLMEngine
    from glm_ray.engine.sampling_params import SamplingParams

    options = EngineOptions(device=str(device), dtype="auto", max_num_seqs=requests,
                            max_num_batched_tokens=max(2048, 8 * prompt_len), max_model_len=prompt_len + output_len,
                            kv_cache_memory=(8 << 30) if device.type == "cuda" else (256 << 20))
    engine = LLMEngine(model_dir, options, experts=experts)
    vocab = engine.model_config.vocab_size
    gen = torch.Generator().manual_seed(1)
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)

    def one_run(tag: str) -> tuple[float, int]:
        for r in range(requests):
            ids = torch.randint(100, vocab, (prompt_len,), generator=gen).tolist()
            engine.add_request(f"{tag}-{r}", ids, params)
        synchronize(device)
        start, produced = time.perf_counter(), 0
        while engine.has_unfinished():
            produced += sum(len(d.new_token_ids) for d in engine.step())
        synchronize(device)
        return time.perf_counter() - start, produced

    one_run("warmup")
    seconds, produced = one_run("timed")
    report = {"requests": requests, "prompt_tokens": prompt_len, "output_tokens": output_len,
              "dtype": str(engine.dtype), "expert_backend": getattr(getattr(engine.experts, "compute", None), "name",
                                                                     type(engine.experts).__name__),
              "seconds": seconds, "output_tokens_per_s": produced / seconds}
    if breakdown:
        experts_timer, sampler_timer = _Timed(engine.runner.experts, device), _Timed(engine.runner.sampler, device)
        engine.runner.experts, engine.runner.sampler = experts_timer, sampler_timer
        steps0 = engine.step_stats["step_s"]
        one_run("breakdown")
        total = engine.step_stats["step_s"] - steps0
        report["breakdown_s"] = {"total": total, "routed_experts": experts_timer.seconds,
                                 "sampling": sampler_timer.seconds,
                                 "attention_and_rest": total - experts_timer.seconds - sampler_timer.seconds}
    return report


def run_disaggregated(model_dir: Path, device: torch.device, requests: int, prompt_len: int, output_len: int) -> dict:
    from glm_ray.config import load_model_config
    from glm_ray.experts.remote import EventLoopThread, RemoteExperts, StaticReplicas
    from glm_ray.experts.server import ExpertServer
    from glm_ray.model.loader import load_weights
    from glm_ray.router.placement import Placement

    config = load_model_config(model_dir)
    placement = Placement.contiguous(config.n_routed_experts, 2)
    loops, servers, addresses = [], [], {}
    for g in range(2):
        weights = load_weights(model_dir, config, dense=False, expert_ids=placement.experts_of(g), device=device)
        loop = EventLoopThread(f"bench-expert-group-{g}")
        server = ExpertServer(weights.experts, g)
        addresses[g] = [loop.run(server.start())]
        loops.append(loop)
        servers.append(server)
    try:
        with RemoteExperts(placement, StaticReplicas(addresses), device=device) as remote:
            report = run_engine(model_dir, device, requests, prompt_len, output_len, experts=remote,
                                breakdown=False)
            report["transport"] = remote.stats.take()
            report["expert_backend"] = servers[0].compute.name
    finally:
        for loop, server in zip(loops, servers):
            loop.run(server.stop(None))
            loop.stop()
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m glm_ray.bench.gpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (the measurement) or cpu (a smoke run on toy shapes)")
    p.add_argument("--out", default="gpu-report.json", help="the JSON report")
    p.add_argument("--sections", default="peak,moe_layer,engine,disaggregated")
    p.add_argument("--workdir", default=None, help="where the model is written (default a temporary directory)")
    args = p.parse_args(argv)
    from glm_ray.device import resolve_device

    device = resolve_device(args.device)
    smoke = device.type != "cuda"
    sections = args.sections.split(",")
    report: dict = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "device": str(device), "smoke": smoke,
                    "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    if device.type == "cuda":
        report["gpu"] = torch.cuda.get_device_name(device)
        report["capability"] = "sm_%d%d" % torch.cuda.get_device_capability(device)
    for name in ("deepspeed", "dskernels"):
        try:
            report[f"{name}_version"] = __import__(name).__version__
        except Exception as e:  # noqa: BLE001
            report[f"{name}_version"] = f"not importable: {type(e).__name__}: {e}"
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="glm-ray-gpu-"))
    requests, prompt_len, output_len = (256, 128, 128) if not smoke else (8, 16, 8)

    def section(name, fn):
        if name not in sections:
            return
        print(f"[{time.strftime('%H:%M:%S')}] {name} ...", file=sys.stderr, flush=True)
        try:
            report[name] = fn()
        except Exception as e:  # noqa: BLE001 - later sections still run; the report says what broke
            report[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
        Path(args.out).write_text(json.dumps(report, indent=2))  # what is done survives a timeout

    section("peak", lambda: measure_peak(device, 8192 if not smoke else 256))
    section("moe_layer", lambda: measure_moe_layer(device, AIR if not smoke else SMOKE,
                                                   [64, 512, 4096, 16384] if not smoke else [16, 64]))
    model_dir = None
    if {"engine", "disaggregated"} & set(sections):
        model_dir, made_s = make_air_model(workdir / "air-4l", 4, smoke)
        report["model"] = {"dir": str(model_dir), "layers": 4, "make_model_s": made_s}
    section("engine", lambda: run_engine(model_dir, device, requests, prompt_len, output_len))
    section("disaggregated", lambda: run_disaggregated(model_dir, device, requests, prompt_len, output_len))
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k != "model"}, indent=2)[:6000])
    return 0


if __name__ == "__main__":
    sys.exit(main())
