"""`glm-ray bench --breakdown`: the per-process CPU accounting, the stages' request sets, whole-request
HTTP runs, and the engine stage end to end (the cluster stages are measured in BENCHMARKS.md)."""

import argparse
import json
import os
import subprocess
import sys
import threading
from http.server import ThreadingHTTPServer

import pytest

from glm_ray.bench import add_bench_parser, run_bench
from glm_ray.bench import proc_cpu
from glm_ray.bench.breakdown import STAGES, stage_workload
from glm_ray.bench.online import run_online
from glm_ray.bench.workloads import NUM_SPECIAL_TOKENS, make_workload


def test_roles_name_serve_replicas_by_deployment_and_ray_daemons():
    assert proc_cpu.role_of(5, "ray::ServeReplica:glm-ray:AttentionReplica", "ray::ServeRepl", 1) == \
        "AttentionReplica"
    assert proc_cpu.role_of(5, "ray::ServeReplica:my-app:ExpertGroup_1 ", "ray::ServeRepl", 1) == "ExpertGroup_1"
    assert proc_cpu.role_of(5, "ray::ProxyActor", "ray::ProxyActor", 1) == "ProxyActor"
    assert proc_cpu.role_of(5, "/venv/lib/ray/core/src/ray/raylet/raylet --flags", "raylet", 1) == "raylet"
    assert proc_cpu.role_of(5, "/x/gcs_server --port 1", "gcs_server", 1) == "gcs_server"
    assert proc_cpu.role_of(5, "haproxy -f cfg", "haproxy", 1) == "other"
    assert proc_cpu.role_of(7, "python -m glm_ray.cli bench", "python", 7) == "bench client"


def test_cpu_by_role_counts_from_the_first_snapshot_and_new_processes_whole():
    before = {10: ("ray worker (idle)", 5.0), 11: ("ProxyActor", 2.0), 12: ("other", 1.0)}
    after = {10: ("AttentionReplica", 9.0),  # a worker retitled as a replica: the same process
             11: ("ProxyActor", 2.5), 13: ("ExpertGroup_0", 1.5)}  # 12 ended, 13 is new
    spent = proc_cpu.cpu_by_role(before, after)
    assert spent == {"AttentionReplica": pytest.approx(4.0), "ExpertGroup_0": pytest.approx(1.5),
                     "ProxyActor": pytest.approx(0.5)}
    assert list(spent) == ["AttentionReplica", "ExpertGroup_0", "ProxyActor"]  # largest first


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_busy_child_process_shows_its_cpu():
    before = proc_cpu.snapshot()
    child = subprocess.Popen([sys.executable, "-c", "import time\nt = time.process_time()\n"
                              "while time.process_time() - t < 0.6: pass\ninput()"],
                             stdin=subprocess.PIPE, text=True)
    try:
        while child.pid not in proc_cpu.snapshot() or proc_cpu.snapshot()[child.pid][1] < 0.6:
            assert child.poll() is None
        spent = proc_cpu.cpu_by_role(before, proc_cpu.snapshot())
    finally:
        child.communicate("\n", timeout=30)
    assert spent["other"] >= 0.6  # the child: not a Ray process, not this one
    assert before[os.getpid()][0] == "bench client"


def test_every_stage_gets_the_same_shapes_with_prompts_no_other_stage_has():
    vocab = 1000
    base = make_workload("C", vocab, seed=3, num_requests=8)
    loads = [stage_workload(base, i, vocab) for i in range(len(STAGES))]
    for load in loads:
        assert [len(p) for p in load.prompts] == [len(p) for p in base.prompts]
        assert load.output_lens == base.output_lens
        assert all(0 <= t < vocab - NUM_SPECIAL_TOKENS for p in load.prompts for t in p)
    firsts = {load.prompts[0] for load in loads}
    assert len(firsts) == len(loads)  # a prefix cache holding one stage's prompts misses the next's


def test_whole_requests_over_http_arrive_as_one_chunk_each(tmp_path):
    from test_bench import _FakeVllm

    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 1024}))
    handler = type("Handler", (_FakeVllm,), {"root": str(tmp_path), "bodies": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        workload = make_workload("D", 1024, num_requests=4, scale=0.1)
        run = run_online(f"http://127.0.0.1:{server.server_port}", workload, concurrency=2, stream=False,
                         vocab_size=1024)
        run_online(f"http://127.0.0.1:{server.server_port}", workload, concurrency=2, stream=False,
                   vocab_size=1024, warmup=False)
    finally:
        server.shutdown()
        server.server_close()
    # two streamed warmups, then the run; the second run (warmup=False: the breakdown warms once) only its 4
    assert len(handler.bodies) == 2 + 4 + 4 and all(not b.get("stream") for b in handler.bodies[2:])
    assert run["num_output_tokens"] == sum(workload.output_lens)
    assert run["chunk_sizes"] == [[n] for n in workload.output_lens]


def _bench_args(*argv):
    parser = argparse.ArgumentParser()
    add_bench_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["bench", *argv])


def test_engine_stage_reports_throughput_and_cpu_per_token(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "breakdown.json"
    args = _bench_args("--breakdown", "--stages", "engine", "--model", str(tiny_model_dir), "--workload", "D",
                       "--num-requests", "4", "--scale", "0.1", "--kv-cache-mib", "16", "--output", str(out))
    assert run_bench(args) == 0
    report = json.loads(out.read_text())
    engine = report["stages"]["engine"]
    assert engine["num_output_tokens"] == report["workload"]["num_output_tokens"] and engine["output_tokens_per_s"] > 0
    cpu = engine["cpu"]
    assert cpu["cpu_ms_per_token"]["engine process"] == pytest.approx(cpu["cpu_ms_per_token_total"])
    assert 0 < cpu["cores_busy"] <= cpu["cores"] + 0.5
    assert "engine alone" in capsys.readouterr().out


def test_an_unknown_stage_is_named():
    with pytest.raises(SystemExit, match="--stages nope"):
        run_bench(_bench_args("--breakdown", "--stages", "engine,nope"))
