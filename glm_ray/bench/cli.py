"""`glm-ray bench`: the engine against transformers on workloads A and B, each system in its own process.

This process only orchestrates (it never loads a model), so the children's peak RSS is their own.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from glm_ray.bench import stats
from glm_ray.argtypes import number_in, positive_int
from glm_ray.bench.isolate import run_in_child
from glm_ray.bench.load_step_timeline import DEFAULT_LOAD_STEP, parse_phases
from glm_ray.bench.soak import DEFAULT_SOAK, parse_soak
from glm_ray.bench.report import compare, format_table, load_average, mean_ratio, new_report
from glm_ray.bench.workloads import SPECS, make_workload

ALL_WORKLOADS = ("A", "B")  # `--workload all`: the issue-3 targets; C and D are run by name

DEFAULT_PRESET = "small"


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "bench", help="benchmark the engine against transformers' generate, or a running server",
        description="Offline throughput and latency of the in-process engine against transformers' generate "
                    "on the same checkpoint, plus the machine's matmul peak and a decode step's achieved FLOP/s; "
                    "with --url, the same workloads sent to a running server's OpenAI API instead.")
    p.add_argument("--model", default=None,
                   help=f"checkpoint directory (default: the built-in {DEFAULT_PRESET} preset, built once and cached)")
    p.add_argument("--workload", choices=[*SPECS, "all"], default="all",
                   help="A: 64 x (32 prompt, 128 output); B: 256 mixed requests (prompts 16..512, outputs 16..256); "
                        "C: 128 mixed (prompts 16..384, outputs 16..192); D: 128 x (32 prompt, 128 output); "
                        "all: A and B")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="compute dtype of both systems")
    p.add_argument("--url", default=None, metavar="http://HOST:PORT",
                   help="load a running OpenAI-compatible server (glm-ray's or vLLM's: its /v1/completions, "
                        "streamed) instead of in-process systems; reports output tok/s, TTFT, ITL (gaps between "
                        "token-carrying chunks, as vLLM's benchmark_serving) and TPOT. --model gives the "
                        "vocabulary when the server's /v1/models does not (vLLM)")
    p.add_argument("--api-key", default=None, help="with --url: the server's API key (default: $GLM_RAY_API_KEY)")
    p.add_argument("--concurrency", type=positive_int, default=None,
                   help="with --url: requests in flight at once (default: the workload's 64)")
    p.add_argument("--load-step", nargs="?", type=parse_phases, const=parse_phases(DEFAULT_LOAD_STEP), default=None,
                   metavar="CLIENTS:SECONDS,...",
                   help="with --url: a load step instead of the workloads: phases of closed-loop clients "
                        f"(default {DEFAULT_LOAD_STEP}), a timeline of tokens/s, latencies and replicas per "
                        "deployment from /metrics, written to --output (default load-step.json) and --plot")
    p.add_argument("--soak", nargs="?", type=parse_soak, const=parse_soak(DEFAULT_SOAK), default=None,
                   metavar="CLIENTS:SECONDS",
                   help=f"with --url of a server on this machine: CLIENTS streaming clients for SECONDS (default "
                        f"{DEFAULT_SOAK}); errors, TTFT and inter-token latency, and every process's resident memory "
                        "over the first minute against the last (--output, default soak.json)")
    p.add_argument("--max-tokens", type=positive_int, default=128,
                   help="--load-step, --soak: output tokens per request")
    p.add_argument("--prompt-tokens", type=positive_int, default=32,
                   help="--load-step, --soak: prompt tokens per request")
    p.add_argument("--plot", default=None, metavar="FILE.png",
                   help="--load-step: the timeline plot (default: --output with .png; needs matplotlib)")
    p.add_argument("--no-baseline", action="store_true", help="skip transformers")
    p.add_argument("--distributed", action="store_true",
                   help="also run the disaggregated app (expert groups over gRPC) on a local Ray cluster")
    p.add_argument("--expert-groups", type=positive_int, default=None,
                   help="G of the --distributed and --breakdown runs (default 2) and of --rebalance (default 4)")
    p.add_argument("--rebalance", action="store_true",
                   help="a skewed routing (the small preset with --hot-experts always chosen, all in group 0) "
                        "through G expert groups with --redundant-experts spare slots: throughput, balancedness "
                        "and the slowest group's expert time per step, before, during and after a live rebalance, "
                        "and the longest engine step during it against the median step around it")
    p.add_argument("--redundant-experts", type=positive_int, default=2, help="--rebalance: R spare slots per group")
    p.add_argument("--hot-experts", type=positive_int, default=3,
                   help="--rebalance without --model: experts 0..N-1 are chosen by every token")
    p.add_argument("--attention-cpus", type=positive_int, default=None,
                   help="--distributed: CPUs reserved by the attention replica, and its threads sharing "
                        "each layer's attention (default: every core)")
    p.add_argument("--stream", action="store_true",
                   help="--distributed: stream every token to the bench as it is made (one Serve message per "
                        "request and step); default whole requests, as the offline engine run returns them")
    p.add_argument("--breakdown", action="store_true",
                   help="where the served path's throughput goes: one workload (default D) through the engine, "
                        "an attention replica with local then remote experts, the HTTP ingress whole and "
                        "streamed, and the colocated app streamed; tok/s and CPU per token of every process")
    p.add_argument("--stages", type=lambda t: [s.strip() for s in t.split(",") if s.strip()], default=None,
                   metavar="STAGE,...", help="--breakdown: only these stages (default all: engine, colocated, remote, "
                                             "http-whole, http-stream, colocated-http-stream)")
    p.add_argument("--http-proxy", choices=["haproxy", "serve"], default="haproxy",
                   help="--breakdown: what serves HTTP on its cluster, as `glm-ray serve --http-proxy`")
    p.add_argument("--no-flops", action="store_true", help="skip the matmul peak and decode-step FLOP/s measurement")
    p.add_argument("--output", default=None, metavar="FILE.json", help="write the full JSON report here")
    p.add_argument("--num-requests", type=positive_int, default=None,
                   help="use only the first N requests of each workload (a quick smoke run)")
    p.add_argument("--scale", type=number_in(0, 1, low_open=True), default=1.0,
                   help="shrink each workload's request count and lengths by this factor in (0, 1]")
    p.add_argument("--seed", type=int, default=0, help="seed of the request sets")
    p.add_argument("--repeat", type=positive_int, default=1,
                   help="run each system this many times, alternating, and report each one's best run "
                        "(a busy machine only ever slows a run down)")
    p.add_argument("--kv-cache-mib", type=positive_int, default=2048,
                   help="the engine's KV cache size in MiB (allocated up front, so it shows in its peak RSS)")
    p.add_argument("--decode-attention", choices=["torch", "cpu-kernel"], default="torch",
                   help="the in-process engine's decode attention (engine option decode_attention)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch threads in each measured process (default: torch's choice, one per core)")
    p.add_argument("--decode-batch", type=positive_int, default=64, help="batch of the decode-step FLOP measurement")
    p.add_argument("--matmul-size", type=positive_int, default=2048, help="n of the n^3 matmul peak measurement")
    p.set_defaults(func=run_bench)
    return p


def _build_default_model() -> dict:
    from glm_ray.model.default import default_model_dir

    return {"path": str(default_model_dir(DEFAULT_PRESET, seed=0))}


def resolve_model_dir(model: str | None) -> Path:
    if model is None:
        from glm_ray.model.default import FORMAT_VERSION, cache_root

        path = cache_root() / "models" / f"{DEFAULT_PRESET}-seed0-v{FORMAT_VERSION}"
        if (path / "config.json").is_file():
            return path
        _log(f"building the {DEFAULT_PRESET} model in {path} (once) ...")
        return Path(run_in_child(_build_default_model)["path"])  # ~1 GB for a moment: not in this process
    path = Path(model)
    if not (path / "config.json").is_file():
        raise SystemExit(f"glm-ray: error: --model {model}: no config.json there (build one with "
                         "`glm-ray make-model --out DIR`)")
    return path


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _best(runs: list[dict]) -> dict:
    """The run with the highest throughput: other processes on the machine only ever slow a run down."""
    best = max(runs, key=lambda r: r["output_tokens_per_s"])
    return {**best, "repeats_output_tokens_per_s": [r["output_tokens_per_s"] for r in runs]}


def bench_workload(name: str, model_dir: Path, vocab_size: int, args) -> dict:
    """Both systems on one workload, each run in its own process (alternating when repeated), and
    how they compare."""
    from glm_ray.bench.hf_baseline import run_hf
    from glm_ray.bench.offline import run_engine

    workload = make_workload(name, vocab_size, args.seed, args.num_requests, args.scale)
    _log(f"workload {name}: {workload.num_requests} requests, {workload.num_output_tokens} output tokens")
    progress = sys.stderr.isatty()
    runs = {"engine": [], "hf": [], "distributed": []}
    tokens = {}
    if args.distributed:
        from glm_ray.bench.distributed import run_distributed
    for i in range(args.repeat):
        _log(f"  engine ({i + 1}/{args.repeat}) ...")
        run = run_in_child(run_engine, model_dir, workload, args.dtype, progress, args.kv_cache_mib << 20,
                           args.decode_attention, num_threads=args.threads)
        runs["engine"].append(stats.summarize_run(run))
        tokens["engine"] = run["token_ids"]
        if not args.no_baseline:
            _log(f"  transformers ({i + 1}/{args.repeat}) ...")
            run = run_in_child(run_hf, model_dir, workload, args.dtype, progress, num_threads=args.threads)
            runs["hf"].append(stats.summarize_run(run))
            tokens["hf"] = run["token_ids"]
        if args.distributed:
            _log(f"  distributed app (G={args.expert_groups or 2}, N=1) on a local Ray cluster "
                 f"({i + 1}/{args.repeat}) ...")
            run = run_in_child(run_distributed, model_dir, workload, args.dtype, (args.expert_groups or 2), 1,
                               attention_cpus=args.attention_cpus, stream=args.stream)
            runs["distributed"].append({**stats.summarize_run(run), "breakdown": run["breakdown"]})
            tokens["distributed"] = run["token_ids"]
    entry = {"workload": workload.summary(), "engine": _best(runs["engine"])}
    if args.distributed:
        entry["distributed"] = _best(runs["distributed"])
        entry["distributed_vs_engine"] = (entry["distributed"]["output_tokens_per_s"]
                                          / entry["engine"]["output_tokens_per_s"])
        entry["distributed_vs_engine_mean"] = mean_ratio(entry["distributed"], entry["engine"])
        entry["distributed_agreement"] = stats.token_agreement(tokens["distributed"], tokens["engine"])
    if not args.no_baseline:
        entry["hf"] = _best(runs["hf"])
        entry["speedup"] = compare(entry["engine"], entry["hf"], name)
        entry["agreement"] = stats.token_agreement(tokens["engine"], tokens["hf"])
    return entry


def run_url_bench(args) -> int:
    """Each chosen workload against a running server; its peak RSS and threads are not ours to see."""
    from glm_ray.bench.online import (ITL_DEFINITION, ServerError, run_online, served_model, served_vocab_size,
                                      summarize_online)

    try:
        info = served_model(args.url, args.api_key)
        vocab_size = served_vocab_size(info, args.model)
    except ServerError as e:
        raise SystemExit(f"glm-ray: error: --url {args.url}: {e}") from None
    report = new_report(sys.argv, f"{args.url} ({info['id']})", args.dtype, args.seed)
    report["arguments"] = {k: v for k, v in vars(args).items() if k != "func"}
    report["server_model"] = info
    offline_only = ("ITL", "hf:", "peak_rss", "all requests")
    report["notes"] = [n for n in report["notes"] if not n.startswith(offline_only)] + [
        "--url: requests are sent at most --concurrency at a time (a new one when one ends); TTFT is from each "
        "request's own send time", ITL_DEFINITION]
    for name in (ALL_WORKLOADS if args.workload == "all" else [args.workload]):
        workload = make_workload(name, vocab_size, args.seed, args.num_requests, args.scale)
        _log(f"workload {name}: {workload.num_requests} requests, {workload.num_output_tokens} output tokens "
             f"to {args.url}, at most {args.concurrency or workload.max_num_seqs} at once")
        try:
            run = run_online(args.url, workload, progress=sys.stderr.isatty(), concurrency=args.concurrency,
                             api_key=args.api_key, vocab_size=vocab_size)
        except ServerError as e:
            raise SystemExit(f"glm-ray: error: {e}") from None
        report["workloads"][name] = {"workload": workload.summary(), "server": summarize_online(run),
                                     "concurrency": min(args.concurrency or workload.max_num_seqs,
                                                        workload.num_requests)}
    report["machine"]["load_average_at_end"] = load_average()
    print(format_table(report))
    _write(report, args.output)
    return 0


def run_breakdown(args) -> int:
    """`--breakdown`: the stages of `glm_ray.bench.breakdown`, on one workload, in two children."""
    import socket

    from glm_ray.bench.breakdown import STAGES, describe, format_breakdown, run_cluster_stages, run_engine_stage
    from glm_ray.config import load_model_config

    if args.url:
        raise SystemExit("glm-ray: error: --breakdown starts its own servers; it takes no --url")
    chosen = args.stages or list(STAGES)
    unknown = [s for s in chosen if s not in STAGES]
    if unknown:
        raise SystemExit(f"glm-ray: error: --stages {','.join(unknown)}: no such stage (choose from "
                         f"{', '.join(STAGES)})")
    name = "D" if args.workload == "all" else args.workload
    model_dir = resolve_model_dir(args.model)
    vocab_size = load_model_config(model_dir).vocab_size
    workload = make_workload(name, vocab_size, args.seed, args.num_requests, args.scale)
    concurrency = min(args.concurrency or workload.max_num_seqs, workload.num_requests)
    report = new_report(sys.argv, str(model_dir), args.dtype, args.seed)
    report["arguments"] = {k: v for k, v in vars(args).items() if k != "func"}
    report["workload"] = workload.summary()
    kv = args.kv_cache_mib << 20
    _log(f"workload {name}: {workload.num_requests} requests, {workload.num_output_tokens} output tokens")
    stages = {}
    if "engine" in chosen:
        _log("stage engine ...")
        stages["engine"] = run_in_child(run_engine_stage, model_dir, workload, args.dtype, kv,
                                        num_threads=args.threads)
    on_cluster = [s for s in chosen if s != "engine"]
    if on_cluster:
        with socket.socket() as s:  # a free port for the stages' HTTP server
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        _log("stages on a local Ray cluster: " + ", ".join(on_cluster) + " ...")
        stages |= run_in_child(run_cluster_stages, model_dir, workload, args.dtype, kv, (args.expert_groups or 2),
                               concurrency, port, vocab_size, on_cluster, args.attention_cpus, args.http_proxy)
    stages = {n: stages[n] for n in STAGES if n in stages}
    report["stages"] = {n: {"description": describe(n, (args.expert_groups or 2), concurrency, args.http_proxy),
                            **e["summary"]} for n, e in stages.items()}
    report["machine"]["load_average_at_end"] = load_average()
    print(format_breakdown(stages, (args.expert_groups or 2), concurrency, args.http_proxy))
    _write(report, args.output)
    return 0


def run_rebalance_bench(args) -> int:
    """`--rebalance`: glm_ray.bench.rebalance in a child process."""
    from glm_ray.bench.rebalance import format_rebalance, run_rebalance, skewed_model
    from glm_ray.config import load_model_config

    if args.url:
        raise SystemExit("glm-ray: error: --rebalance starts its own cluster; it takes no --url")
    if args.model is None:
        _log(f"the small preset with experts 0..{args.hot_experts - 1} always routed to (built once) ...")
        model_dir = Path(run_in_child(skewed_model, DEFAULT_PRESET, args.hot_experts)["path"])
    else:
        model_dir = resolve_model_dir(args.model)
    name = "D" if args.workload == "all" else args.workload
    workload = make_workload(name, load_model_config(model_dir).vocab_size, args.seed, args.num_requests, args.scale)
    groups = args.expert_groups or 4
    report = new_report(sys.argv, str(model_dir), args.dtype, args.seed)
    report["arguments"] = {k: v for k, v in vars(args).items() if k != "func"}
    report["workload"] = workload.summary()
    _log(f"workload {name}: {workload.num_requests} requests, {workload.num_output_tokens} output tokens, three "
         f"times on G={groups}, R={args.redundant_experts} (before, during and after a rebalance) ...")
    result = run_in_child(run_rebalance, model_dir, workload, args.dtype, groups, args.redundant_experts,
                          args.kv_cache_mib << 20, args.attention_cpus)
    print(format_rebalance(result))
    for phase in result["phases"].values():
        phase.pop("token_ids", None)
    report["rebalance"] = result
    report["machine"]["load_average_at_end"] = load_average()
    _write(report, args.output)
    return 0


def _write(report: dict, output: str | None) -> None:
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(json.dumps(report, indent=2) + "\n")
        _log(f"wrote {output}")


def run_bench(args) -> int:
    from glm_ray.bench.flops import run_flops
    from glm_ray.config import load_model_config

    if args.soak is not None:
        from glm_ray.bench.soak import run_soak

        return run_soak(args)
    if args.load_step is not None:
        from glm_ray.bench.load_step import run_load_step

        return run_load_step(args)
    if args.breakdown:
        return run_breakdown(args)
    if args.rebalance:
        return run_rebalance_bench(args)
    if args.url:
        return run_url_bench(args)

    model_dir = resolve_model_dir(args.model)
    vocab_size = load_model_config(model_dir).vocab_size
    report = new_report(sys.argv, str(model_dir), args.dtype, args.seed)
    report["arguments"] = {k: v for k, v in vars(args).items() if k != "func"}
    for name in (ALL_WORKLOADS if args.workload == "all" else [args.workload]):
        report["workloads"][name] = bench_workload(name, model_dir, vocab_size, args)
    if not args.no_flops:
        _log("matmul peak and decode step ...")
        report["flops"] = run_in_child(run_flops, model_dir, args.dtype, args.decode_batch, args.matmul_size,
                                       args.kv_cache_mib << 20, num_threads=args.threads)
    report["machine"]["load_average_at_end"] = load_average()

    print(format_table(report))
    for name, entry in report["workloads"].items():
        if "distributed" in entry:
            d, b = entry["distributed"], entry["distributed"]["breakdown"]
            how = "streamed token by token" if (d.get("options") or {}).get("streaming") else "whole requests"
            print(f"workload {name} distributed ({how}): {d['output_tokens_per_s']:.1f} tok/s = "
                  f"{entry['distributed_vs_engine']:.2f}x in-process (target >= 0.7x); per step "
                  f"{b['step_ms']:.1f} ms: attention {b['attention_compute_ms']:.1f}, dispatch wait "
                  f"{b['dispatch_wait_ms']:.1f}, serialisation {b['serialisation_ms']:.1f}, expert compute "
                  f"{b['expert_compute_ms']:.1f} (summed over groups)")
            if entry.get("distributed_vs_engine_mean") is not None:
                each = ", ".join(f"{t:.1f}" for t in d["repeats_output_tokens_per_s"])
                print(f"  distributed runs {each} tok/s; mean run vs mean run: "
                      f"{entry['distributed_vs_engine_mean']:.2f}x in-process")
            if "breakdown" in entry["engine"]:
                e = entry["engine"]["breakdown"]
                print(f"workload {name} in-process per step {e['step_ms']:.1f} ms: attention and rest "
                      f"{e['attention_compute_ms']:.1f}, expert compute {e['expert_compute_ms']:.1f}")
    _write(report, args.output)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m glm_ray.bench` until `glm-ray bench` is hooked into glm_ray/cli.py."""
    parser = argparse.ArgumentParser(prog="glm-ray")
    add_bench_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["bench", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)
