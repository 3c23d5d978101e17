"""The benchmark report: a JSON document with everything measured, and a short table for people."""

from __future__ import annotations

import datetime
import hashlib
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

# engine tokens/s over the baseline's, per workload (from the issue)
TARGET_SPEEDUP = {"A": 1.0, "B": 2.0}


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def cpu_model() -> str | None:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or None


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def code_version() -> dict:
    """Which glm_ray code ran: the git commit, whether the tree had changes, and a digest of the
    package's .py files (tells apart runs on different uncommitted states)."""
    package = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes())
    version = {"source_sha256": digest.hexdigest()[:16], "commit": None, "dirty": None}
    try:
        def git(*cmd):
            return subprocess.run(["git", *cmd], cwd=package, capture_output=True, text=True, timeout=10,
                                  check=True).stdout.strip()
        version["commit"] = git("rev-parse", "HEAD")
        version["dirty"] = bool(git("status", "--porcelain", "--", "."))
    except (OSError, subprocess.SubprocessError):
        pass  # not a git checkout (an installed wheel)
    return version


def machine_facts() -> dict:
    """Facts read without importing torch (the parent process stays small)."""
    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_model": cpu_model(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": _version("torch"),
        "transformers": _version("transformers"),
        "glm_ray": _version("glm-ray"),
        "load_average_at_start": load_average(),
    }


def mean_ratio(system: dict, baseline: dict) -> float | None:
    """With --repeat, mean run over mean run (on a noisy machine best-vs-best can swing either
    way); None unless both systems ran more than once."""
    runs = system.get("repeats_output_tokens_per_s", []), baseline.get("repeats_output_tokens_per_s", [])
    if not all(len(r) > 1 for r in runs):
        return None
    means = [sum(r) / len(r) for r in runs]
    return means[0] / means[1] if means[1] else None


def compare(engine: dict, baseline: dict | None, workload: str) -> dict | None:
    """Ratios engine/baseline (throughput) and baseline/engine (latencies): above 1 favours the engine."""
    if baseline is None:
        return None

    def ratio(a, b):
        return a / b if a is not None and b else None

    speedup = ratio(engine["output_tokens_per_s"], baseline["output_tokens_per_s"])
    target = TARGET_SPEEDUP.get(workload)
    return {
        "output_tokens_per_s": speedup,
        "mean_output_tokens_per_s": mean_ratio(engine, baseline),
        "ttft_p50": ratio(baseline["ttft_ms"]["p50"], engine["ttft_ms"]["p50"]),
        "itl_p50": ratio(baseline["itl_ms"]["p50"], engine["itl_ms"]["p50"]),
        "peak_rss": ratio(baseline["peak_rss_mib"], engine["peak_rss_mib"]),
        "target_output_tokens_per_s": target,
        "target_met": None if target is None or speedup is None else speedup >= target,
    }


def new_report(argv: list[str], model_dir: str, dtype: str, seed: int) -> dict:
    return {
        "command": " ".join(argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_facts(),
        "code": code_version(),
        "model_dir": model_dir,
        "dtype": dtype,
        "seed": seed,
        "workloads": {},
        "flops": None,
        "notes": [
            "output_tokens_per_s counts requested output tokens only, over the timed run's wall time "
            "(model load and a 2-request warmup excluded)",
            "all requests arrive at the start of the timed run; TTFT = first token - arrival",
            "hf: static batches of max_num_seqs in request order; token times from a streamer per decoding step, "
            "so a later batch's TTFT includes the batches before it",
            "ITL percentiles pool every gap between consecutive tokens of one request",
            "peak_rss_mib: VmHWM of the system's own spawned process",
            "with --repeat N each system's figures are from its run with the highest tokens/s; "
            "speedup.mean_output_tokens_per_s is the ratio of the two systems' mean runs",
        ],
    }


def _fmt(value, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


HEADER = f"{'system':<8} {'tok/s':>9} {'wall s':>8} {'TTFT p50/p99 ms':>18} {'ITL p50/p99 ms':>16} {'RSS MiB':>8}"


def _system_lines(system: str, s: dict) -> list[str]:
    ttft = _fmt(s["ttft_ms"]["p50"], ".0f") + " / " + _fmt(s["ttft_ms"]["p99"], ".0f")
    itl = _fmt(s["itl_ms"]["p50"]) + " / " + _fmt(s["itl_ms"]["p99"])
    lines = [f"{system:<8} {_fmt(s['output_tokens_per_s']):>9} {_fmt(s['wall_time_s'], '.2f'):>8} {ttft:>18} "
             f"{itl:>16} {_fmt(s['peak_rss_mib'], '.0f'):>8}"]
    if s.get("tpot_ms") is not None:  # a --url run: ITL is per token-carrying chunk (see online.py)
        chunk = s.get("tokens_per_chunk") or {}
        lines.append(f"{'':<8} TPOT p50/p99 {_fmt(s['tpot_ms']['p50'])} / {_fmt(s['tpot_ms']['p99'])} ms; "
                     f"{_fmt(chunk.get('mean'), '.2f')} tokens per streamed chunk (max {chunk.get('max')}); "
                     f"ITL = gap between token-carrying chunks")
    if len(s.get("repeats_output_tokens_per_s", [])) > 1:
        lines.append(f"{'':<8} tok/s of each run (best shown): "
                     + ", ".join(f"{x:.1f}" for x in s["repeats_output_tokens_per_s"]))
    if s.get("cpu_utilization") is not None and s["cpu_utilization"] < 0.8:
        lines.append(f"{'':<8} warning: {system} got {100 * s['cpu_utilization']:.0f}% of its "
                     f"{s['torch_num_threads']} threads' CPU time: starved by other processes")
    return lines


def _workload_lines(name: str, w: dict) -> list[str]:
    spec = w["workload"]
    lines = ["", f"workload {name}: {spec['num_requests']} requests, {spec['num_prompt_tokens']} prompt + "
                 f"{spec['num_output_tokens']} output tokens ({spec['description']})", HEADER]
    for system in ("engine", "hf", "server"):
        if w.get(system) is not None:
            lines += _system_lines(system, w[system])
    c = w.get("speedup")
    if c:
        verdict = "met" if c["target_met"] else "MISSED"
        lines.append(f"speedup engine/hf: {_fmt(c['output_tokens_per_s'], '.2f')}x tokens/s "
                     f"(target >= {c['target_output_tokens_per_s']}x: {verdict})")
        if c.get("mean_output_tokens_per_s") is not None:
            lines.append(f"  mean run vs mean run: {c['mean_output_tokens_per_s']:.2f}x")
    if w.get("agreement"):
        a = w["agreement"]
        lines.append(f"greedy outputs identical to hf: {a['identical_requests']}/{a['num_requests']} requests")
    return lines


def _flops_lines(f: dict) -> list[str]:
    d = f["decode_step"]
    peaks = ", ".join(f"{p['dtype']} {p['gflops']:.1f} GFLOP/s (n={p['n']})" for p in f["matmul_peak"].values())
    return [
        "",
        f"matmul peak: {peaks}; cpu capability {f['cpu_capability']}",
        f"decode step, batch {d['batch']}, {d['dtype']}: {d['flops_per_step'] / 1e9:.2f} GFLOP in "
        f"{d['step_time_ms']['median']:.1f} ms = {d['achieved_gflops']:.1f} GFLOP/s "
        f"({100 * f['decode_fraction_of_peak']:.1f}% of peak)",
        f"  reads ~{sum(d['bytes_per_step_first_step'].values()) / 1e6:.0f} MB a step = "
        f"{d['achieved_read_gbps']:.1f} GB/s ({100 * f['decode_fraction_of_bandwidth']:.0f}% of the "
        f"{f['memory_bandwidth']['gbps']:.1f} GB/s measured read bandwidth)",
        f"  model runner alone (no scheduling, no detokenizing): {d['model_runner_time_ms']['median']:.1f} ms, "
        f"{100 * f['decode_fraction_of_peak_model_runner']:.1f}% of peak",
    ]


def format_table(report: dict) -> str:
    m = report["machine"]
    lines = []
    busy = m.get("load_average_at_start")
    if busy and busy[0] > 0.5:
        lines.append(f"warning: the machine was busy at the start (1-min load {busy[0]}); figures may be low or noisy")
    lines.append(f"{m['cpu_model']} ({m['cpus_usable']} cpus), torch {m['torch']}, dtype {report['dtype']}, "
                 f"load {m.get('load_average_at_start')} -> {m.get('load_average_at_end')}")
    code = report.get("code") or {}
    lines.append(f"code: commit {str(code.get('commit'))[:10]}{' + local changes' if code.get('dirty') else ''}, "
                 f"glm_ray sources {code.get('source_sha256')}")
    for name, w in report["workloads"].items():
        lines += _workload_lines(name, w)
    if report.get("flops"):
        lines += _flops_lines(report["flops"])
    return "\n".join(lines)
