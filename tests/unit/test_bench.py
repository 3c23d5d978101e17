"""`glm-ray bench`: request sets, the statistics, the FLOP count, and one tiny end-to-end report."""

import argparse
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from glm_ray.bench import add_bench_parser, run_bench
from glm_ray.bench.cli import ALL_WORKLOADS
from glm_ray.bench.flops import run_flops, step_bytes, token_flops
from glm_ray.bench.online import (ServerError, chunk_gaps, served_vocab_size, summarize_online,
                                  time_per_output_token)
from glm_ray.bench.report import compare, format_table, mean_ratio, new_report
from glm_ray.bench.stats import inter_token_gaps, percentile, token_agreement
from glm_ray.bench.workloads import NUM_SPECIAL_TOKENS, make_workload
from glm_ray.config import config_from_dict
from glm_ray.model.synthetic import preset_config


def test_workloads_match_the_issue_and_are_seeded():
    a = make_workload("A", 1024, seed=0)
    assert a.num_requests == 64 and {len(p) for p in a.prompts} == {32} and set(a.output_lens) == {128}
    b = make_workload("B", 1024, seed=0)
    assert b.num_requests == 256 and b.max_num_seqs == 64
    assert all(16 <= len(p) <= 512 for p in b.prompts) and all(16 <= n <= 256 for n in b.output_lens)
    assert max(t for p in b.prompts for t in p) < 1024 - NUM_SPECIAL_TOKENS
    assert make_workload("B", 1024, seed=0) == b and make_workload("B", 1024, seed=1) != b
    cut = make_workload("B", 1024, seed=0, num_requests=10)
    assert cut.prompts == b.prompts[:10] and cut.output_lens == b.output_lens[:10]
    small = make_workload("B", 1024, seed=0, scale=0.25)
    assert small.num_requests == 64 and all(4 <= n <= 64 for n in small.output_lens)
    with pytest.raises(ValueError, match="unknown workload"):
        make_workload("E", 1024)


def test_serving_workloads_c_and_d():
    c = make_workload("C", 1024, seed=0)
    assert c.num_requests == 128 and c.max_num_seqs == 64
    assert all(16 <= len(p) <= 384 for p in c.prompts) and all(16 <= n <= 192 for n in c.output_lens)
    assert len({len(p) for p in c.prompts}) > 50 and len(set(c.output_lens)) > 50  # really mixed
    d = make_workload("D", 1024, seed=0)
    assert d.num_requests == 128 and {len(p) for p in d.prompts} == {32} and set(d.output_lens) == {128}
    assert d.prompts[:64] != make_workload("A", 1024, seed=0).prompts  # a seed stream of its own
    parser = argparse.ArgumentParser()
    add_bench_parser(parser.add_subparsers(dest="command"))
    for name in ("A", "B", "C", "D", "all"):
        assert parser.parse_args(["bench", "--workload", name]).workload == name
    assert ALL_WORKLOADS == ("A", "B")  # `all` stays the issue-3 pair


def test_itl_is_the_gap_between_token_carrying_chunks():
    # request 1: chunks of 1, 3, 1 tokens at 1.0, 1.1, 1.4 s; request 2: one token each at 2.0, 2.05, 2.1, 2.3 s;
    # request 3: a single 1-token chunk (no gap); request 4: nothing streamed
    chunk_times = [[1.0, 1.1, 1.4], [2.0, 2.05, 2.1, 2.3], [3.0], []]
    sizes = [[1, 3, 1], [1, 1, 1, 1], [1], []]
    gaps = chunk_gaps(chunk_times)
    assert gaps == pytest.approx([0.1, 0.3, 0.05, 0.05, 0.2])  # the 3-token chunk is ONE 0.1 s sample
    assert time_per_output_token(chunk_times, [5, 4, 1, 0]) == pytest.approx([0.4 / 4, 0.3 / 3])
    run = {"wall_time_s": 4.0, "num_requests": 4, "num_output_tokens": 10, "num_generated_tokens": 10,
           "ttft_s": [0.5, 1.0, 0.25, None], "chunk_times_s": chunk_times, "chunk_sizes": sizes,
           "token_times_s": [[t for t, k in zip(ts, ks) for _ in range(k)] for ts, ks in zip(chunk_times, sizes)]}
    s = summarize_online(run)
    assert s["output_tokens_per_s"] == pytest.approx(2.5)
    assert s["itl_ms"]["count"] == 5
    assert s["itl_ms"]["p50"] == pytest.approx(100.0)  # sorted 50, 50, 100, 200, 300
    assert s["itl_ms"]["p99"] == pytest.approx(200.0 + 0.96 * 100.0)  # rank 3.96: between 200 and 300
    assert s["itl_ms"]["max"] == pytest.approx(300.0) and s["itl_ms"]["mean"] == pytest.approx(140.0)
    assert s["tpot_ms"]["count"] == 2 and s["tpot_ms"]["p50"] == pytest.approx(100.0)
    assert s["ttft_ms"]["p50"] == pytest.approx(500.0) and s["ttft_ms"]["count"] == 3
    assert s["tokens_per_chunk"] == {"mean": pytest.approx(10 / 8), "max": 3, "num_chunks": 8}
    # per-token pooling (the offline definition) would have made two 0 ms samples of the 3-token chunk
    assert inter_token_gaps(run["token_times_s"]).count(0.0) == 2
    report = new_report(["glm-ray", "bench", "--url", "x"], "x", "float32", 0)
    report["workloads"]["C"] = {"workload": {"num_requests": 4, "num_prompt_tokens": 8, "num_output_tokens": 10,
                                             "description": "test"}, "server": s}
    table = format_table(report)
    assert "server" in table and "100.0 / 296.0" in table and "1.25 tokens per streamed chunk" in table


def test_vocab_size_when_the_server_does_not_say(tmp_path):
    assert served_vocab_size({"id": "m", "vocab_size": 151552}) == 151552
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 1024}))
    assert served_vocab_size({"id": "small", "root": str(tmp_path)}) == 1024  # vLLM: root is the model dir
    assert served_vocab_size({"id": "small", "root": "/nowhere"}, model_dir=str(tmp_path)) == 1024
    with pytest.raises(ServerError, match="--model"):
        served_vocab_size({"id": "small", "root": "org/remote-model"})


class _FakeVllm(BaseHTTPRequestHandler):
    """/v1/models without vocab_size (as vLLM), completions streamed 1 or 2 tokens a chunk, a finish chunk
    without tokens, then the usage chunk with no choices, then [DONE]; or whole, with `stream` false."""

    root = ""
    bodies: list = []

    def log_message(self, *args):
        pass

    def do_GET(self):
        self._send_json({"object": "list", "data": [{"id": "small", "object": "model", "root": self.root,
                                                      "max_model_len": 2048}]})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        type(self).bodies.append(body)
        if not body.get("stream"):
            n = body["max_tokens"]
            self._send_json({"choices": [{"index": 0, "text": "x" * n, "token_ids": list(range(n)),
                                          "finish_reason": "length"}],
                             "usage": {"prompt_tokens": len(body["prompt"]), "completion_tokens": n,
                                       "total_tokens": len(body["prompt"]) + n}})
            return
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.end_headers()
        n, sent = body["max_tokens"], 0

        def event(obj):
            self.wfile.write(b"data: " + json.dumps(obj).encode() + b"\n\n")
            self.wfile.flush()

        while sent < n:
            k = min(n - sent, 1 + sent % 2)
            event({"choices": [{"index": 0, "text": "x" * k, "token_ids": list(range(sent, sent + k)),
                                "finish_reason": None}], "usage": None})
            sent += k
        event({"choices": [{"index": 0, "text": "", "finish_reason": "length"}], "usage": None})
        event({"choices": [], "usage": {"prompt_tokens": len(body["prompt"]), "completion_tokens": n,
                                        "total_tokens": len(body["prompt"]) + n}})
        self.wfile.write(b"data: [DONE]\n\n")

    def _send_json(self, obj):
        data = json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def test_url_bench_against_a_vllm_like_server(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 1024}))
    handler = type("Handler", (_FakeVllm,), {"root": str(tmp_path), "bodies": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        out = tmp_path / "r.json"
        parser = argparse.ArgumentParser()
        add_bench_parser(parser.add_subparsers(dest="command"))
        args = parser.parse_args(["bench", "--url", f"http://127.0.0.1:{server.server_port}", "--workload", "D",
                                  "--num-requests", "6", "--scale", "0.1", "--concurrency", "3",
                                  "--output", str(out)])
        assert run_bench(args) == 0
    finally:
        server.shutdown()
        server.server_close()
    sent = handler.bodies[2:]  # after the 2 warmup requests
    assert len(sent) == 6 and all(b["model"] == "small" and b["ignore_eos"] and b["return_token_ids"]
                                  and b["stream_options"] == {"include_usage": True} for b in sent)
    assert all(max(b["prompt"]) < 1024 - NUM_SPECIAL_TOKENS for b in sent)
    s = json.loads(out.read_text())["workloads"]["D"]["server"]
    assert s["num_output_tokens"] == 6 * 13 and s["output_tokens_per_s"] > 0
    assert s["tokens_per_chunk"]["max"] == 2 and s["itl_ms"]["count"] == 6 * (7 - 1)  # 13 tokens in 7 chunks (1, 2, 2, ...)
    assert s["ttft_ms"]["count"] == 6 and s["tpot_ms"]["count"] == 6
    assert "tokens per streamed chunk" in capsys.readouterr().out


def test_statistics():
    assert percentile([], 50) is None
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([0.0, 10.0], 99) == pytest.approx(9.9)
    assert inter_token_gaps([[0.0, 1.0, 3.0], [5.0], []]) == [1.0, 2.0]
    agreement = token_agreement([[1, 2, 3], [4, 5]], [[1, 2, 3], [4, 6]])
    assert agreement["identical_requests"] == 1 and agreement["matching_prefix_token_fraction"] == pytest.approx(0.8)


def test_decode_flops_of_the_small_preset():
    config = config_from_dict(preset_config("small"))
    flops = token_flops(config, context_len=0)
    # 2 x (8 x (qkv 512x768 + o 512x512) + dense 3x512x1024 + 7 x (router 512x32 + 5 experts x 3x512x256)
    #      + lm_head 512x1024)
    assert sum(flops.values()) == 2 * (8 * (512 * 768 + 512 * 512) + 3 * 512 * 1024
                                       + 7 * (512 * 32 + 5 * 3 * 512 * 256) + 512 * 1024)
    assert 0.040e9 < sum(flops.values()) < 0.044e9  # ray-notes: ~0.042 GFLOP per token
    assert token_flops(config, 100)["attention_qk_pv"] == 4 * 8 * 8 * 64 * 100
    traffic = step_bytes(config, [40] * 64, itemsize=4)
    assert traffic["routed_experts"] == pytest.approx(4 * 7 * 32 * 3 * 512 * 256, rel=1e-3)  # all experts at B=64
    assert traffic["kv_cache"] == 4 * 2 * 8 * 128 * 40 * 64
    held_bf16 = step_bytes(config, [40] * 64, itemsize=4, expert_itemsize=2)  # a bf16 checkpoint's experts
    assert held_bf16["routed_experts"] == traffic["routed_experts"] / 2
    assert held_bf16["dense_weights"] == traffic["dense_weights"] and held_bf16["kv_cache"] == traffic["kv_cache"]


def test_bench_writes_a_sane_report(tiny_model_dir, tmp_path):
    model_dir = tiny_model_dir
    out = tmp_path / "report.json"
    parser = argparse.ArgumentParser()
    add_bench_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", "--model", str(model_dir), "--workload", "B", "--num-requests", "4",
                              "--scale", "0.125", "--output", str(out), "--matmul-size", "128",
                              "--no-flops", "--kv-cache-mib", "16"])
    assert run_bench(args) == 0

    report = json.loads(out.read_text())
    assert report["machine"]["cpu_count"] >= 1 and report["machine"]["torch"] and report["date"]
    assert report["command"]
    entry = report["workloads"]["B"]
    want_tokens = entry["workload"]["num_output_tokens"]
    assert entry["workload"]["num_requests"] == 4
    for system in ("engine", "hf"):
        s = entry[system]
        assert s["num_requests"] == 4 and s["num_output_tokens"] == want_tokens
        assert s["num_generated_tokens"] >= want_tokens
        assert s["output_tokens_per_s"] > 0 and s["wall_time_s"] > 0
        for metric in ("ttft_ms", "itl_ms"):
            assert 0 <= s[metric]["p50"] <= s[metric]["p99"] <= s[metric]["max"]
        assert s["peak_rss_mib"] > 0
    assert entry["engine"]["num_generated_tokens"] == want_tokens
    assert entry["speedup"]["output_tokens_per_s"] > 0 and entry["speedup"]["target_output_tokens_per_s"] == 2.0
    assert entry["agreement"]["num_requests"] == 4

    assert "workload B" in format_table(report)


def test_flops_figures(tiny_model_dir):
    flops = run_flops(tiny_model_dir, batch=4, matmul_size=128, kv_cache_memory=16 << 20, bandwidth_mib=16)
    assert {"float32", "bfloat16"} <= set(flops["matmul_peak"])
    assert all(p["gflops"] > 0 for p in flops["matmul_peak"].values())
    decode = flops["decode_step"]
    assert decode["batch"] == 4 and decode["num_timed_steps"] == 16
    assert decode["flops_per_step"] > 0 and decode["achieved_gflops"] > 0 and decode["achieved_read_gbps"] > 0
    assert 0 < flops["decode_fraction_of_peak"] and flops["memory_bandwidth"]["gbps"] > 0
    report = new_report(["glm-ray", "bench"], str(tiny_model_dir), "float32", 0)
    report["flops"] = flops
    assert "decode step, batch 4" in format_table(report)


def _system(tok_s: float, runs: list[float]) -> dict:
    return {"output_tokens_per_s": tok_s, "repeats_output_tokens_per_s": runs,
            "ttft_ms": {"p50": 100.0}, "itl_ms": {"p50": 10.0}, "peak_rss_mib": 100.0}


def test_repeated_runs_also_compare_their_means():
    # best vs best says 0.9x (misses A's 1.0x), the means say 1.1x: the report shows both
    c = compare(_system(90.0, [90.0, 88.0, 86.0]), _system(100.0, [100.0, 60.0, 80.0]), "A")
    assert c["output_tokens_per_s"] == pytest.approx(0.9) and c["target_met"] is False
    assert c["mean_output_tokens_per_s"] == pytest.approx(88.0 / 80.0)
    report = new_report(["glm-ray", "bench"], "model", "float32", 0)
    report["workloads"]["A"] = {"workload": {"num_requests": 3, "num_prompt_tokens": 96, "num_output_tokens": 384,
                                             "description": "test"},
                                "engine": None, "speedup": c}
    assert "mean run vs mean run: 1.10x" in format_table(report)
    # a single run each: no mean ratio
    assert compare(_system(90.0, [90.0]), _system(100.0, [100.0]), "A")["mean_output_tokens_per_s"] is None
    # the distributed app against the in-process engine uses the same mean ratio
    assert mean_ratio(_system(200.0, [200.0, 160.0]), _system(400.0, [400.0, 360.0])) == pytest.approx(180.0 / 380.0)
    assert mean_ratio(_system(200.0, [200.0]), _system(400.0, [400.0, 360.0])) is None
