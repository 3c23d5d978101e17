"""`glm-ray bench --url URL --load-step`: the schedule parser, the pure timeline on synthetic records,
the /metrics parser on a page the real Metrics renders, and a short step against the real OpenAI app
under uvicorn over a FakeBackend, writing the JSON and the PNG."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import threading

import pytest

from glm_ray.bench.cli import add_bench_parser
from glm_ray.bench import load_step
from glm_ray.bench.load_step import LoadStep, parse_metrics
from glm_ray.bench.load_step_plot import require_matplotlib
from glm_ray.bench.load_step_timeline import (MetricsSample, Phase, RequestRecord, build_timeline, parse_phases,
                                              phase_at, summarize)
from glm_ray.serving.api_keys import ApiKeys
from glm_ray.serving.openai.app import create_app
from glm_ray.serving.openai.metrics import Metrics
from glm_ray.tokenizer import Tokenizer

from fake_backend import FakeBackend
from uvicorn_server import UvicornServer

KEY = "load-step-key-0123456789"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def bench_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="glm-ray")
    add_bench_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["bench", *argv])


def test_phases_parse_and_default():
    assert parse_phases("1:20, 16:60,0:2.5") == [Phase(1, 20.0), Phase(16, 60.0), Phase(0, 2.5)]
    assert bench_args("--url", "http://x", "--load-step").load_step == [Phase(1, 20), Phase(16, 60), Phase(1, 40)]
    assert bench_args("--url", "http://x").load_step is None
    assert phase_at([Phase(1, 2), Phase(3, 2)], 1.99) == 0 and phase_at([Phase(1, 2), Phase(3, 2)], 2) == 1
    assert phase_at([Phase(1, 2)], 2) is None


@pytest.mark.parametrize("value", ["16", "a:5", "4:0", "4:-1", "-1:5", "1:20,,2:3", "0:5,0:3", "2:inf", "99999:1"])
def test_cli_refuses_bad_load_step(value, capsys):
    with pytest.raises(SystemExit):
        bench_args("--url", "http://x", f"--load-step={value}")  # "=": argparse takes "-1:5" for an option
    err = capsys.readouterr().err
    assert "--load-step" in err and repr(value) in err


def test_load_step_needs_url():
    args = bench_args("--load-step", "1:1")
    with pytest.raises(SystemExit, match="--url"):
        args.func(args)


def test_missing_matplotlib_fails_before_any_load(monkeypatch, http, backend):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import raises ImportError
    with pytest.raises(SystemExit, match=r"pip install 'glm-ray\[bench\]'"):
        require_matplotlib()
    before = len(backend.requests)
    args = bench_args("--url", http.url, "--api-key", KEY, "--load-step", "1:1")
    with pytest.raises(SystemExit, match="matplotlib"):
        args.func(args)
    assert len(backend.requests) == before


def _request(phase, sent, end, tokens, error=None):
    return RequestRecord(phase, sent, end, tuple(tokens), error)


def test_timeline_counts_and_percentiles():
    phases = [Phase(1, 2), Phase(3, 2)]
    requests = [
        _request(0, 0.0, 0.5, [0.2, 0.3, 0.4]),  # row 0: 3 tokens, latency 0.5, TTFT 0.2
        _request(0, 0.5, 1.5, [0.9, 1.1, 1.4]),  # 1 token in row 0, 2 in row 1
        _request(1, 2.0, 2.25, [2.1]),
        _request(1, 2.0, 2.75, [2.5, 2.6]),
        _request(1, 2.0, 3.0, [2.9]),  # ends exactly at 3: row 3
        _request(1, 2.1, 2.2, [], error="HTTP 503: overloaded"),
        _request(1, 3.5, 3.9, [3.6], error="mid-stream: boom"),  # its token still counts
    ]
    replicas = {"ExpertGroup_0": {"running": 1, "starting": 1, "draining": 0}}
    samples = [MetricsSample(0.01, replicas, {"0": {"busy_fraction": 0.5, "tokens_per_s": 10.0}},
                             {"r1": {"sequences": 2.0, "kv_usage": 0.1}}),
               MetricsSample(1.02, error="ConnectionError: refused"),
               MetricsSample(2.01, {"ExpertGroup_0": {"running": 2, "starting": 0, "draining": 0}})]
    rows = build_timeline(phases, requests, samples, end_s=4.0)
    assert [r["t_s"] for r in rows] == [0, 1, 2, 3]
    assert [r["phase"] for r in rows] == [0, 0, 1, 1] and [r["clients"] for r in rows] == [1, 1, 3, 3]
    assert [r["output_tokens_per_s"] for r in rows] == [4, 2, 4, 1] and all(r["seconds"] == 1 for r in rows)
    assert [r["requests_completed"] for r in rows] == [1, 1, 2, 1]
    assert [r["errors"] for r in rows] == [0, 0, 1, 1]
    assert [r["in_flight"] for r in rows] == [1.0, 0.5, 2.1, 0.4]
    assert rows[0]["latency_p50_s"] == rows[0]["latency_p99_s"] == 0.5
    assert rows[0]["ttft_p50_s"] == pytest.approx(0.2)
    assert rows[2]["latency_p50_s"] == pytest.approx(0.5) and rows[2]["latency_p99_s"] == pytest.approx(0.745)
    assert rows[2]["ttft_p50_s"] == pytest.approx(0.3) and rows[2]["ttft_p99_s"] == pytest.approx(0.496)
    # the failed sample at 1.02 is skipped: row 1 still shows the one from 0.01
    assert rows[0]["replicas"] == rows[1]["replicas"] == replicas and rows[1]["metrics_t_s"] == 0.01
    assert rows[0]["group_busy_fraction"] == {"0": 0.5} and rows[0]["attention_sequences"] == {"r1": 2.0}
    assert rows[2]["replicas"]["ExpertGroup_0"]["running"] == 2 and rows[3]["metrics_t_s"] == 2.01

    summary = summarize(phases, requests, samples, end_s=4.0)
    assert (summary["num_requests"], summary["num_completed"], summary["num_errors"]) == (7, 5, 2)
    assert summary["num_output_tokens"] == 11 and summary["output_tokens_per_s"] == 11 / 4
    assert summary["errors"] == [{"message": "HTTP 503: overloaded", "count": 1, "first_t_s": 2.2},
                                 {"message": "mid-stream: boom", "count": 1, "first_t_s": 3.9}]
    assert (summary["num_metrics_samples"], summary["num_metrics_errors"]) == (3, 1)
    assert summary["max_running_replicas"] == {"ExpertGroup_0": 2}
    first, second = summary["phases"]
    assert (first["start_s"], first["end_s"], first["requests_completed"], first["errors"]) == (0, 2, 2, 0)
    assert first["output_tokens_per_s"] == 3 and second["output_tokens_per_s"] == 2.5
    assert first["max_running_replicas"] == {"ExpertGroup_0": 1} and second["requests_completed"] == 3


def test_timeline_runs_past_the_schedule():
    rows = build_timeline([Phase(1, 1)], [_request(0, 0.5, 2.5, [1.0, 2.2])], [], end_s=2.5)
    assert [(r["phase"], r["clients"], r["output_tokens"]) for r in rows] == [(0, 1, 0), (None, 0, 1), (None, 0, 1)]
    assert [r["seconds"] for r in rows] == [1, 1, 0.5] and rows[2]["output_tokens_per_s"] == 2  # a half second
    assert [r["in_flight"] for r in rows] == [0.5, 1, 1]
    assert rows[2]["requests_completed"] == 1 and rows[0]["replicas"] is None


def test_parse_metrics_of_a_real_page():
    stats = asyncio.run(FakeBackend(None).stats())
    sample = parse_metrics(Metrics().render(stats).decode(), t_s=3.0)
    assert sample.t_s == 3.0 and sample.error is None
    assert sample.deployments == {"ExpertGroup_0": {"running": 2, "starting": 1, "draining": 0},
                                  "AttentionReplica": {"running": 1, "starting": 0, "draining": 1}}
    assert sample.groups == {"0": {"busy_fraction": 0.5, "tokens_per_s": 1200.0},
                             "1": {"busy_fraction": 0.125, "tokens_per_s": 300.0}}
    assert sample.attention == {"r1": {"sequences": 3.0, "kv_usage": 0.25}}
    empty = parse_metrics(Metrics().render(None).decode(), t_s=0.0)
    assert empty.deployments == {} and empty.groups == {} and empty.attention == {}


class PacedBackend(FakeBackend):
    """FakeBackend with a pause before each piece, so closed-loop clients do not spin."""

    async def generate(self, request: dict):
        async for delta in super().generate(request):
            await asyncio.sleep(0.02)
            yield delta


@pytest.fixture(scope="module")
def backend(tiny_model_dir):
    return PacedBackend(Tokenizer.from_pretrained(tiny_model_dir))


@pytest.fixture(scope="module")
def http(backend):
    server = UvicornServer(create_app(backend, api_keys=ApiKeys([KEY])))
    yield server
    server.stop()


def test_load_step_end_to_end(http, backend, tmp_path, capsys):
    backend.script = ["a"] * 4  # one token (id 7) per piece: 4 = --max-tokens
    out = tmp_path / "report.json"
    args = bench_args("--url", http.url, "--api-key", KEY, "--load-step", "1:2,3:2,1:2", "--max-tokens", "4",
                      "--prompt-tokens", "8", "--output", str(out))
    assert args.func(args) == 0
    report = json.loads(out.read_text())
    assert {"command", "url", "model", "schedule", "phases", "timeline", "summary", "requests"} <= set(report)
    assert report["url"] == http.url and report["model"] == "fake" and report["schedule"] == "1:2,3:2,1:2"
    assert [(p["clients"], p["start_s"], p["end_s"]) for p in report["phases"]] == [(1, 0, 2), (3, 2, 4), (1, 4, 6)]
    timeline, summary = report["timeline"], report["summary"]
    assert 6 <= len(timeline) <= 8 and [row["t_s"] for row in timeline] == list(range(len(timeline)))
    assert all(row["seconds"] == 1 for row in timeline)  # the run ends on a whole second
    assert [row["clients"] for row in timeline[:6]] == [1, 1, 3, 3, 1, 1]
    busy = [row for row in timeline if row["phase"] == 1]
    assert all(row["output_tokens_per_s"] > 0 and row["latency_p99_s"] > 0 for row in busy)
    assert summary["num_errors"] == 0 and summary["errors"] == []
    assert summary["num_output_tokens"] == 4 * summary["num_requests"] > 0
    assert summary["phases"][1]["output_tokens_per_s"] > summary["phases"][0]["output_tokens_per_s"]
    assert summary["num_metrics_samples"] >= 5 and summary["num_metrics_errors"] == 0
    assert timeline[1]["replicas"]["ExpertGroup_0"] == {"running": 2, "starting": 1, "draining": 0}
    assert timeline[1]["group_busy_fraction"] == {"0": 0.5, "1": 0.125}
    assert summary["max_running_replicas"] == {"ExpertGroup_0": 2, "AttentionReplica": 1}
    sent = backend.requests[-1]
    assert sent["sampling_params"]["ignore_eos"] and len(sent["prompt_token_ids"]) == 8
    assert (tmp_path / "report.png").read_bytes()[:8] == PNG_SIGNATURE
    assert "max running replicas" in capsys.readouterr().out


def test_load_step_records_errors(http, backend, tmp_path):
    backend.fail = RuntimeError("the engine fell over")
    try:
        args = bench_args("--url", http.url, "--api-key", KEY, "--load-step", "1:1", "--max-tokens", "4",
                          "--output", str(tmp_path / "r.json"), "--plot", str(tmp_path / "plots" / "t.png"))
        assert args.func(args) == 0
    finally:
        backend.fail = None
    summary = json.loads((tmp_path / "r.json").read_text())["summary"]
    assert summary["num_errors"] == summary["num_requests"] >= 1 and summary["num_completed"] == 0
    assert "the engine fell over" in summary["errors"][0]["message"]
    assert (tmp_path / "plots" / "t.png").is_file()


def test_a_stuck_request_is_recorded_as_abandoned(http, backend, monkeypatch):
    monkeypatch.setattr(load_step, "DRAIN_TIMEOUT_S", 0.3)
    monkeypatch.setattr(load_step, "CONNECT_TIMEOUT_S", 0.3)  # how long the cut waits for a stream to notice
    backend.gate = threading.Event()  # the server takes the request and never answers
    try:
        records, samples, end_s = LoadStep(http.url, "fake", 100, [Phase(1, 0.5)], prompt_tokens=4, max_tokens=4,
                                           api_key=KEY).run()
    finally:
        backend.gate.set()
        backend.gate = None
    assert end_s == 2 and len(records) == 1 and samples
    assert records[0].error.startswith("abandoned") and records[0].end_s == 2 and records[0].phase == 0
