"""`glm-ray bench --url URL --soak [CLIENTS:SECONDS]`: a soak against a running server on this machine.

CLIENTS closed-loop streaming clients (the load step's, glm_ray/bench/load_step.py) for SECONDS
(default 200 for 120 s), while the resident memory of every process of this user (the server's
Ray processes, by role) is read from /proc each second. The report: errors (the target is none),
TTFT and inter-token latency (p50 / p99), and each process's RSS, mean over the first minute
against the mean over the last: growth under 10% is the target (a leak grows without end; a
cache that fills levels off). Processes are matched by pid, so a replica that restarted shows as
two entries.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

from glm_ray.bench import proc_cpu
from glm_ray.bench.load_step import LoadStep, Phase
from glm_ray.bench.load_step_timeline import parse_phases

DEFAULT_SOAK = "200:120"
GROWTH_TARGET = 0.10


def rss_snapshot(uid: int | None = None) -> dict[int, tuple[str, int]]:
    """{pid: (role, resident bytes)} for every process of `uid` (default: ours)."""
    return {pid: (role, rss) for pid, (role, _, rss) in proc_cpu.processes(uid).items()}


class RssSampler:
    """Every process's RSS once a second, on a thread, as (t_s, {pid: (role, bytes)})."""

    def __init__(self, clock):
        self.clock, self.samples = clock, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="soak-rss", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            self.samples.append((self.clock(), rss_snapshot()))


def rss_growth(samples: list[tuple[float, dict[int, tuple[str, int]]]], duration_s: float,
               window_s: float = 60.0) -> list[dict]:
    """Per process seen in both windows: mean RSS over the first `window_s` and the last, and the
    growth between them; largest processes first. A run shorter than two windows splits in halves."""
    window = min(window_s, duration_s / 2)
    first = [s for t, s in samples if t < window]
    last = [s for t, s in samples if t >= duration_s - window]
    out = []
    for pid in sorted({p for s in first for p in s} & {p for s in last for p in s}):
        a = [s[pid][1] for s in first if pid in s]
        b = [s[pid][1] for s in last if pid in s]
        role = next(s[pid][0] for s in last if pid in s)
        first_mib, last_mib = statistics.mean(a) / 2**20, statistics.mean(b) / 2**20
        out.append({"pid": pid, "role": role, "first_mib": round(first_mib, 1), "last_mib": round(last_mib, 1),
                    "growth": round(last_mib / first_mib - 1, 4) if first_mib else None})
    return sorted(out, key=lambda r: -r["last_mib"])


def run_soak(args) -> int:
    from glm_ray.bench.online import ServerError, served_model
    from glm_ray.bench.report import code_version, machine_facts

    if not args.url:
        raise SystemExit("glm-ray: error: --soak drives a running server on this machine: give its --url")
    url = args.url.rstrip("/")
    try:
        info = served_model(url, args.api_key)
    except ServerError as e:
        raise SystemExit(f"glm-ray: error: --url {args.url}: {e}") from None
    phase = args.soak
    print(f"soak: {phase.num_clients} streaming clients for {phase.duration_s:g} s against {url} ({info['id']}), "
          f"{args.prompt_tokens}-token prompts, {args.max_tokens} output tokens each", file=sys.stderr, flush=True)
    step = LoadStep(url, info["id"], info["vocab_size"], [phase], args.prompt_tokens, args.max_tokens,
                    api_key=args.api_key, seed=args.seed)
    t0 = time.monotonic()
    sampler = RssSampler(lambda: time.monotonic() - t0)
    sampler.start()
    records, samples, end_s = step.run()
    sampler.stop()
    ok = [r for r in records if r.error is None]
    gaps = [b - a for r in ok for a, b in zip(r.token_times_s, r.token_times_s[1:])]
    ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
    growth = rss_growth(sampler.samples, phase.duration_s)
    # the server's processes: the bench client keeps every request's record, so it grows by design
    worst = max((g["growth"] for g in growth if g["growth"] is not None and g["first_mib"] >= 50
                 and g["role"] != "bench client"), default=None)
    errors: dict[str, int] = {}
    for r in records:
        if r.error is not None:
            errors[r.error] = errors.get(r.error, 0) + 1
    report = {
        "command": " ".join(sys.argv), "url": url, "model": info["id"], "code": code_version(),
        "machine": machine_facts(),
        "options": {"clients": phase.num_clients, "duration_s": phase.duration_s, "prompt_tokens": args.prompt_tokens,
                    "max_tokens": args.max_tokens, "seed": args.seed},
        "requests": len(records), "completed": len(ok), "errors": len(records) - len(ok),
        "error_messages": sorted(errors.items(), key=lambda kv: -kv[1])[:10],
        "output_tokens_per_s": sum(len(r.token_times_s) for r in records) / end_s if end_s else None,
        "ttft_ms": _percentiles_ms(ttft), "itl_ms": _percentiles_ms(gaps),
        "rss": growth, "worst_rss_growth_of_server_processes_over_50_mib": worst,
        "rss_target_met": worst is not None and worst < GROWTH_TARGET,
        "metrics_samples": len(samples),
    }
    output = Path(args.output or "soak.json")
    output.write_text(json.dumps(report, indent=2) + "\n")
    print(format_soak(report))
    return 0 if report["errors"] == 0 and report["rss_target_met"] else 1


def _percentiles_ms(values: list[float]) -> dict:
    if not values:
        return {"p50": None, "p99": None, "n": 0}
    q = statistics.quantiles(values, n=100, method="inclusive") if len(values) > 1 else [values[0]] * 99
    return {"p50": round(q[49] * 1000, 2), "p99": round(q[98] * 1000, 2), "n": len(values)}


def format_soak(report: dict) -> str:
    o = report["options"]
    lines = [f"{o['clients']} clients x {o['duration_s']:g} s: {report['completed']} requests completed, "
             f"{report['errors']} errors, {report['output_tokens_per_s']:.1f} output tokens/s",
             f"TTFT p50 {report['ttft_ms']['p50']} ms, p99 {report['ttft_ms']['p99']} ms; "
             f"ITL p50 {report['itl_ms']['p50']} ms, p99 {report['itl_ms']['p99']} ms",
             "RSS, mean of the first minute -> the last (MiB), by process:"]
    for r in report["rss"][:14]:
        growth = "" if r["growth"] is None else f"{100 * r['growth']:+.1f}%"
        lines.append(f"  {r['role']:<34} {r['first_mib']:>8.1f} -> {r['last_mib']:>8.1f}  {growth}")
    for message, n in report["error_messages"]:
        lines.append(f"  error x{n}: {message}")
    worst = report["worst_rss_growth_of_server_processes_over_50_mib"]
    lines.append(f"largest growth of a server process over 50 MiB (the bench client aside): "
                 f"{'n/a' if worst is None else f'{100 * worst:+.1f}%'} (target < {100 * GROWTH_TARGET:.0f}%)")
    return "\n".join(lines)


def parse_soak(text: str) -> Phase:
    """argparse type of --soak: one `CLIENTS:SECONDS` with clients > 0."""
    phases = parse_phases(text)
    if len(phases) != 1:
        raise argparse.ArgumentTypeError(f"--soak takes one CLIENTS:SECONDS (e.g. {DEFAULT_SOAK}), got {text!r}")
    return phases[0]
