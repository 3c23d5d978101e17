"""`glm-ray bench --url URL --load-step 1:20,16:60,1:40`: a load step against a running server.

Closed-loop clients: in each phase N client threads each send a streamed /v1/completions request
(a random token-id prompt, greedy, `ignore_eos`, `return_token_ids`) and send the next when it ends.
When a phase lowers N, the clients above it stop after their current request; when it raises N, new
ones start. A sampler reads /metrics once a second. After the last phase no new request is sent,
and those in flight get DRAIN_TIMEOUT_S to finish (then they are cut and recorded as errors).
A failed request is recorded with its message, never raised, and its client pauses ERROR_PAUSE_S.
The timeline and summary are built afterwards from the records (glm_ray/bench/load_step_timeline.py).
"""

from __future__ import annotations

import json
import math
import random
import sys
import threading
import time
from pathlib import Path

import requests

from glm_ray.bench.load_step_timeline import (MetricsSample, Phase, RequestRecord, build_timeline, phase_bounds,
                                              summarize)
from glm_ray.bench.workloads import NUM_SPECIAL_TOKENS
from glm_ray.client import auth_headers

DRAIN_TIMEOUT_S = 60.0
ERROR_PAUSE_S = 1.0  # a server that refuses at once must not become thousands of errors a second
CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 300.0  # longest silence within one stream
METRICS_TIMEOUT_S = 5.0


def parse_metrics(text: str, t_s: float) -> MetricsSample:
    """The replica and load gauges of a /metrics page (Prometheus text format)."""
    from prometheus_client.parser import text_string_to_metric_families

    deployments: dict[str, dict[str, int]] = {}
    groups: dict[str, dict[str, float]] = {}
    attention: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "glm_ray_deployment_replicas":
                deployments.setdefault(s.labels["deployment"], {})[s.labels["state"]] = int(s.value)
            elif s.name == "glm_ray_expert_group_busy_fraction":
                groups.setdefault(s.labels["group"], {})["busy_fraction"] = s.value
            elif s.name == "glm_ray_expert_group_tokens_per_second":
                groups.setdefault(s.labels["group"], {})["tokens_per_s"] = s.value
            elif s.name == "glm_ray_attention_sequences":
                attention.setdefault(s.labels["replica"], {})["sequences"] = s.value
            elif s.name == "glm_ray_attention_kv_cache_usage_ratio":
                attention.setdefault(s.labels["replica"], {})["kv_usage"] = s.value
    for g in groups.values():
        g.setdefault("busy_fraction", 0.0), g.setdefault("tokens_per_s", 0.0)
    for a in attention.values():
        a.setdefault("sequences", 0.0), a.setdefault("kv_usage", 0.0)
    return MetricsSample(t_s, deployments, groups, attention)


def _error_message(r: requests.Response) -> str:
    try:
        return f"HTTP {r.status_code}: {r.json()['error']['message']}"
    except (ValueError, KeyError, TypeError):
        return f"HTTP {r.status_code}: {r.text[:300]}"


class LoadStep:
    """Clients following `phases` and a /metrics sampler, on one clock; `run()` returns what they saw."""

    def __init__(self, url: str, model: str, vocab_size: int, phases: list[Phase], prompt_tokens: int,
                 max_tokens: int, api_key: str | None = None, seed: int = 0):
        self.url, self.model, self.phases = url.rstrip("/"), model, phases
        self.vocab_size, self.prompt_tokens, self.max_tokens, self.seed = vocab_size, prompt_tokens, max_tokens, seed
        self.headers = auth_headers(api_key)
        self._records: list[RequestRecord] = []
        self._samples: list[MetricsSample] = []
        self._lock = threading.Lock()
        self._target = 0  # clients with an id below it keep sending
        self._phase = 0
        self._active: set[int] = set()
        self._open: dict[int, tuple[int, float]] = {}  # client -> (phase, sent_s) of its request in flight
        self._closed = False  # the run is over: a request ending now was already recorded as abandoned
        self._num_sent = 0
        self._cut = threading.Event()  # the drain timed out: abandon open streams
        self._done = threading.Event()  # stops the sampler
        self._t0 = 0.0

    def _now(self) -> float:
        return time.monotonic() - self._t0

    def run(self) -> tuple[list[RequestRecord], list[MetricsSample], float]:
        """Drive every phase, then the drain: the requests (by send time), the samples, the duration."""
        self._t0 = time.monotonic()
        sampler = threading.Thread(target=self._sample, name="load-step-metrics", daemon=True)
        sampler.start()
        threads: list[threading.Thread] = []
        for i, (phase, (_, end)) in enumerate(zip(self.phases, phase_bounds(self.phases))):
            with self._lock:
                self._target, self._phase = phase.num_clients, i
                for cid in range(phase.num_clients):
                    if cid not in self._active:  # an id above the old target may still be finishing
                        self._active.add(cid)
                        threads.append(threading.Thread(target=self._client, args=(cid,), daemon=True,
                                                        name=f"load-step-client-{cid}"))
                        threads[-1].start()
            time.sleep(max(0.0, end - self._now()))
        with self._lock:
            self._target = 0
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        for t in threads:
            t.join(timeout=max(0.0, deadline - time.monotonic()))
        if any(t.is_alive() for t in threads):
            self._cut.set()
            for t in threads:
                t.join(timeout=CONNECT_TIMEOUT_S)
        end_s = math.ceil(self._now())  # whole seconds: no short last row, whose rate would be noise
        with self._lock:
            self._closed = True
            for phase, sent in self._open.values():  # stuck past the drain and the cut
                self._records.append(RequestRecord(phase, sent, end_s, (), "abandoned: no answer by the end "
                                                   f"of the run, {DRAIN_TIMEOUT_S:.0f} s after the last phase"))
            records = sorted(self._records, key=lambda r: r.sent_s)
        time.sleep(max(0.0, end_s - self._now()))
        self._done.set()
        sampler.join(timeout=METRICS_TIMEOUT_S + 1)
        return records, list(self._samples), end_s

    def _client(self, cid: int) -> None:
        session = requests.Session()
        session.headers.update(self.headers)
        while True:
            with self._lock:
                if cid >= self._target or self._cut.is_set():
                    self._active.discard(cid)
                    return
                phase, n, sent = self._phase, self._num_sent, self._now()
                self._num_sent += 1
                self._open[cid] = phase, sent
            record = self._one_request(session, phase, sent, self._prompt(n))
            with self._lock:
                del self._open[cid]
                if self._closed:
                    return
                self._records.append(record)
            if record.error is not None:
                self._cut.wait(ERROR_PAUSE_S)

    def _prompt(self, n: int) -> list[int]:
        """Request n's prompt: uniform ids below the special tokens, a different one each time (no prefix hits)."""
        rng = random.Random(f"{self.seed}-{n}")
        return [rng.randrange(max(1, self.vocab_size - NUM_SPECIAL_TOKENS)) for _ in range(self.prompt_tokens)]

    def _one_request(self, session: requests.Session, phase: int, sent: float, prompt: list[int]) -> RequestRecord:
        body = {"model": self.model, "prompt": prompt, "max_tokens": self.max_tokens, "temperature": 0,
                "ignore_eos": True, "stream": True, "return_token_ids": True}
        times, error = [], None
        try:
            with session.post(f"{self.url}/v1/completions", json=body, stream=True,
                              timeout=(CONNECT_TIMEOUT_S, READ_TIMEOUT_S)) as r:
                if r.status_code != 200:
                    error = _error_message(r)
                else:
                    error = self._read_stream(r, times)
        except Exception as e:  # noqa: BLE001 - recorded with the request, never raised away
            error = f"{type(e).__name__}: {e}"
        if error is None and len(times) != self.max_tokens:
            error = f"{len(times)} tokens returned for max_tokens {self.max_tokens} with ignore_eos"
        return RequestRecord(phase, sent, self._now(), tuple(times), error)

    def _read_stream(self, r: requests.Response, times: list[float]) -> str | None:
        """Append each token's arrival time to `times`; the stream's error, or None."""
        for line in r.iter_lines():
            if self._cut.is_set():
                return f"cut: still streaming {DRAIN_TIMEOUT_S:.0f} s after the last phase"
            if line == b"data: [DONE]":
                return None
            if not line.startswith(b"data: "):
                continue
            try:
                chunk = json.loads(line[6:])
            except ValueError:
                return f"unreadable stream chunk: {line[:200]!r}"
            if "error" in chunk:
                return f"mid-stream: {chunk['error'].get('message')}"
            for choice in chunk.get("choices") or []:
                now = self._now()
                times += [now] * len(choice.get("token_ids") or [])
        return "the stream ended without [DONE]"

    def _sample(self) -> None:
        """Read /metrics at whole seconds from the start (skipping any a slow read overran)."""
        session = requests.Session()
        session.headers.update(self.headers)
        tick = 0
        while not self._done.wait(max(0.0, tick - self._now())):
            t = self._now()
            try:
                r = session.get(f"{self.url}/metrics", timeout=METRICS_TIMEOUT_S)
                sample = (parse_metrics(r.text, t) if r.status_code == 200
                          else MetricsSample(t, error=_error_message(r)))
            except Exception as e:  # noqa: BLE001 - an unreadable page is one failed sample, not the end of sampling
                sample = MetricsSample(t, error=f"{type(e).__name__}: {e}")
            self._samples.append(sample)
            tick = max(tick + 1, int(self._now()) + 1)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def format_phases(summary: dict) -> str:
    lines = [f"{'phase':>5} {'clients':>7} {'seconds':>11} {'done':>5} {'errors':>6} {'tok/s':>8} "
             f"{'p50 s':>7} {'p99 s':>7}  max running replicas"]
    for p in summary["phases"]:
        def s(x):
            return "-" if x is None else f"{x:.2f}"
        replicas = ", ".join(f"{k} {v}" for k, v in sorted(p["max_running_replicas"].items())) or "-"
        lines.append(f"{p['index']:>5} {p['clients']:>7} {p['start_s']:>5.0f}-{p['end_s']:<5.0f} "
                     f"{p['requests_completed']:>5} {p['errors']:>6} {p['output_tokens_per_s']:>8.1f} "
                     f"{s(p['latency_p50_s']):>7} {s(p['latency_p99_s']):>7}  {replicas}")
    return "\n".join(lines)


def run_load_step(args) -> int:
    """The CLI's --load-step: check everything, drive the step, write the JSON and the PNG."""
    from glm_ray.bench.load_step_plot import plot_timeline, require_matplotlib
    from glm_ray.bench.online import ServerError, served_model
    from glm_ray.bench.report import code_version, machine_facts

    if not args.url:
        raise SystemExit("glm-ray: error: --load-step drives a running server: give its --url http://HOST:PORT")
    output = Path(args.output or "load-step.json")
    plot = Path(args.plot) if args.plot else output.with_suffix(".png")
    require_matplotlib()
    url = args.url.rstrip("/")
    try:
        info = served_model(url, args.api_key)
    except ServerError as e:
        raise SystemExit(f"glm-ray: error: --url {args.url}: {e}") from None
    max_model_len = info.get("max_model_len")
    if max_model_len and args.prompt_tokens + args.max_tokens > max_model_len:
        raise SystemExit(f"glm-ray: error: --prompt-tokens {args.prompt_tokens} + --max-tokens {args.max_tokens} "
                         f"exceeds the server's max_model_len {max_model_len}: lower one of them")
    phases = args.load_step
    schedule = ",".join(f"{p.num_clients}:{p.duration_s:g}" for p in phases)
    _log(f"load step {schedule} against {url} ({info['id']}): {args.prompt_tokens}-token prompts, "
         f"{args.max_tokens} output tokens each, {sum(p.duration_s for p in phases):g} s")
    step = LoadStep(url, info["id"], info["vocab_size"], phases, args.prompt_tokens, args.max_tokens,
                    api_key=args.api_key, seed=args.seed)
    records, samples, end_s = step.run()
    report = {
        "command": " ".join(sys.argv), "url": url, "model": info["id"], "schedule": schedule,
        "code": code_version(), "machine": machine_facts(),
        "options": {"prompt_tokens": args.prompt_tokens, "max_tokens": args.max_tokens, "seed": args.seed,
                    "drain_timeout_s": DRAIN_TIMEOUT_S},
        "phases": [{"index": i, "clients": p.num_clients, "duration_s": p.duration_s, "start_s": start,
                    "end_s": end} for i, (p, (start, end)) in enumerate(zip(phases, phase_bounds(phases)))],
        "timeline": build_timeline(phases, records, samples, end_s),
        "summary": summarize(phases, records, samples, end_s),
        "requests": [{"phase": r.phase, "sent_s": round(r.sent_s, 4), "end_s": round(r.end_s, 4),
                      "ttft_s": None if r.ttft_s is None else round(r.ttft_s, 4),
                      "num_tokens": len(r.token_times_s), "error": r.error} for r in records],
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")
    plot_timeline(report, plot)
    summary = report["summary"]
    print(format_phases(summary))
    print(f"{summary['num_completed']} requests, {summary['num_errors']} errors, "
          f"{summary['output_tokens_per_s']:.1f} output tokens/s over {end_s:.1f} s")
    for e in summary["errors"][:5]:
        print(f"  {e['count']} x {e['message']} (first at {e['first_t_s']:.1f} s)")
    _log(f"wrote {output} and {plot}")
    return 0
