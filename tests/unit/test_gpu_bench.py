"""`python -m glm_ray.bench.gpu --device cpu`: the GPU measurement script's smoke mode, so the one
device call a lent machine allows is not spent finding a bug in it."""

import json

import pytest


def test_smoke_run_writes_every_section(tmp_path):
    from glm_ray.bench.gpu import main

    out = tmp_path / "report.json"
    assert main(["--device", "cpu", "--out", str(out), "--workdir", str(tmp_path / "work")]) == 0
    report = json.loads(out.read_text())
    assert report["smoke"] is True and report["device"] == "cpu"
    assert report["peak"]["tflops"] > 0
    layer = report["moe_layer"]
    assert "error" not in layer
    done = {(r["backend"], r["tokens"]) for r in layer["results"] if "error" not in r}
    assert done >= {("torch", 16), ("torch", 64), ("looped", 16), ("looped", 64)}
    for r in layer["results"]:
        if "error" not in r:
            assert r["tflops"] > 0 and r["max_rel_diff_vs_torch"] < 0.03  # bf16: every backend computes the same
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        assert "need CUDA" in layer["unavailable"]["deepspeed"]
    for name in ("engine", "disaggregated"):
        assert "error" not in report[name], report[name].get("traceback")
        assert report[name]["output_tokens_per_s"] > 0 and report[name]["requests"] == 8
    parts = report["engine"]["breakdown_s"]
    assert parts["routed_experts"] > 0 and parts["sampling"] > 0 and parts["attention_and_rest"] > 0
    assert parts["routed_experts"] + parts["sampling"] + parts["attention_and_rest"] == pytest.approx(parts["total"])
    assert report["disaggregated"]["transport"]["calls"] > 0  # the experts really went over gRPC
