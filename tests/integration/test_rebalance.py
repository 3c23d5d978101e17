"""Live rebalancing on a local Ray cluster: a tiny model whose routing favours experts 0 and 1 (both in
group 0), two expert groups with two spare slots each. A rebalance asked over HTTP copies the hot
experts into group 1 while requests are generating; they finish token-identical to the in-process
LLM, and the same workload afterwards is measurably better balanced."""

import concurrent.futures as cf
import subprocess
import sys
import time

import pytest
import requests

from glm_ray import LLM, SamplingParams
from glm_ray.model.synthetic import make_model
from glm_ray.serving.config import ServeConfig

from .test_serving import deploy, prompts, undeploy

LONG = 160  # tokens each in-flight request generates: long enough to be running across the switch


@pytest.fixture(scope="module")
def skewed_model(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("models") / "hot01", "tiny", seed=0, hot_experts={0: 1.0, 1: 1.0})


@pytest.fixture(scope="module")
def reference(skewed_model):
    llm = LLM(skewed_model, dtype="float32")
    short, long = prompts(8, seed=1), prompts(6, seed=2)
    greedy = dict(temperature=0.0, ignore_eos=True, prompt_logprobs=1)
    return (short, llm.generate([{"prompt_token_ids": p} for p in short], SamplingParams(max_tokens=12, **greedy)),
            long, llm.generate([{"prompt_token_ids": p} for p in long], SamplingParams(max_tokens=LONG, **greedy)))


def generate(base_url, prompt, max_tokens):
    r = requests.post(f"{base_url}/v1/generate", json=dict(prompt_token_ids=prompt, temperature=0.0,
                                                           max_tokens=max_tokens, ignore_eos=True, prompt_logprobs=1),
                      timeout=300)
    assert r.status_code == 200, r.text
    return {**r.json(), "done_at": time.monotonic()}


def assert_same(got, want):
    for g, w in zip(got, want):
        assert g["token_ids"] == w.outputs[0].token_ids
        for pos, entry in enumerate(w.prompt_logprobs[1:], 1):
            tid = str(w.prompt_token_ids[pos])
            assert abs(g["prompt_logprobs"][pos][tid]["logprob"] - entry[int(tid)].logprob) <= 1e-4


def experts(base_url):
    return requests.get(f"{base_url}/v1/experts", timeout=10).json()


def measured_balancedness(base_url, version, wait_s=15):
    """The window's balancedness once group counts for `version` arrived (attention replicas report
    with each table refresh)."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        e = experts(base_url)
        if e["rebalance"]["version"] == version and e["balancedness"]["min"] is not None:
            return e["balancedness"]
        time.sleep(0.3)
    raise AssertionError(f"no balancedness for placement version {version}: {e['balancedness']}")


def test_rebalance_under_load_keeps_outputs_and_evens_the_groups(ray_serve, skewed_model, reference):
    short, short_want, long, long_want = reference
    deploy(ServeConfig(model=str(skewed_model), expert_groups=2, redundant_experts=2, rebalance_threshold=0,
                       dtype="float32", kv_cache_memory=64 << 20, snapshot_refresh_s=0.5, heartbeat_interval_s=0.3,
                       router_resources={"num_cpus": 0.05}), ray_serve)
    try:
        with cf.ThreadPoolExecutor(8) as pool:
            assert_same(list(pool.map(lambda p: generate(ray_serve, p, 12), short)), short_want)
        before = measured_balancedness(ray_serve, 0)
        # contiguous groups: group 0 holds both hot experts, about 2.7 of each token's 4 pairs
        assert before["min"] < 0.85, before

        with cf.ThreadPoolExecutor(8) as pool:
            running = [pool.submit(generate, ray_serve, p, LONG) for p in long]
            time.sleep(1.0)  # they are generating
            asked = requests.post(f"{ray_serve}/v1/experts/rebalance", timeout=30)
            asked_at = time.monotonic()
            assert asked.status_code == 200, asked.text
            record = asked.json()
            assert record["changed"] and record["version"] == 1 and record["state"] == "loading"
            assert record["predicted_after"]["min"] > record["balancedness_before"]["min"] + 0.1
            assert {0, 1} <= set(record["moves"]["1"]["gains"])
            # a second request while the first is loading is refused, with the reason
            again = requests.post(f"{ray_serve}/v1/experts/rebalance", timeout=30)
            assert again.status_code == 409 and "still being loaded" in again.json()["error"]["message"]
            deadline = time.monotonic() + 60
            while (state := experts(ray_serve)["rebalance"])["version"] != 1:
                assert time.monotonic() < deadline, state
                time.sleep(0.1)
            published_at = time.monotonic()
            got = [f.result() for f in running]
        assert all(g["done_at"] > asked_at for g in got), "a request finished before the rebalance started"
        assert max(g["done_at"] for g in got) > published_at, "no request was generating across the switch"
        assert_same(got, long_want)  # token-identical across the switch, prompt logprobs within 1e-4

        with cf.ThreadPoolExecutor(8) as pool:
            assert_same(list(pool.map(lambda p: generate(ray_serve, p, 12), short)), short_want)
        after = measured_balancedness(ray_serve, 1)
        assert after["min"] > before["min"] + 0.1 and after["min"] > 0.9, (before, after)
        print(f"balancedness min {before['min']:.3f} -> {after['min']:.3f} (predicted "
              f"{record['predicted_after']['min']:.3f})")

        # every attention replica moved, so the expert replicas freed version 0's slots
        from ray import serve

        deadline = time.monotonic() + 20
        for g in (0, 1):
            handle = serve.get_deployment_handle(f"ExpertGroup_{g}", app_name="glm-ray")
            while (info := handle.info.remote().result())["placement_versions"] != [1]:
                assert time.monotonic() < deadline, info
                time.sleep(0.3)
            assert len(info["expert_ids"]) == 6 and {0, 1} <= set(info["expert_ids"])
        status = experts(ray_serve)["rebalance"]
        assert status["rebalances"] == 1 and status["failures"] == 0 and status["last"]["state"] == "published"
        assert status["last"]["longest_step_s"] > 0  # attention replicas reported their steps meanwhile
        assert experts(ray_serve)["placement"]["groups"][1][:2] == [0, 1]
        metrics = requests.get(f"{ray_serve}/metrics", timeout=10).text
        assert "glm_ray_expert_rebalances_total 1.0" in metrics
        assert "glm_ray_expert_placement_version 1.0" in metrics
        assert "glm_ray_expert_rebalance_seconds " in metrics
        out = subprocess.run([sys.executable, "-m", "glm_ray.cli", "status", "--url", ray_serve],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and "placement version 1: 6 slots per group (2 redundant), 1 rebalance(s)" \
            in out.stdout, out.stdout + out.stderr
        out = subprocess.run([sys.executable, "-m", "glm_ray.cli", "rebalance", "--url", ray_serve],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and "stays: no placement the policy finds is better" in out.stdout, \
            out.stdout + out.stderr

        # the router restarts (its actor killed): it goes on from version 1, kept in the cluster's store,
        # not from the placement the app was built with, and the app keeps serving exactly
        import ray

        router = [a for a in ray.util.list_named_actors(all_namespaces=True) if "ExpertRouter" in a["name"]]
        ray.kill(ray.get_actor(router[0]["name"], namespace=router[0]["namespace"]), no_restart=True)
        deadline = time.monotonic() + 90
        while True:
            try:
                if requests.get(f"{ray_serve}/health", timeout=10).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, "the app did not come back after the router restarted"
            time.sleep(0.5)
        restored = experts(ray_serve)
        assert restored["rebalance"]["version"] == 1 and restored["placement"]["groups"][1][:2] == [0, 1]
        with cf.ThreadPoolExecutor(8) as pool:
            assert_same(list(pool.map(lambda p: generate(ray_serve, p, 12), short)), short_want)
        for g in (0, 1):  # nobody was told to build or drop anything
            handle = serve.get_deployment_handle(f"ExpertGroup_{g}", app_name="glm-ray")
            assert handle.info.remote().result()["placement_versions"] == [1]
    finally:
        undeploy()


def test_a_replica_that_cannot_build_its_slots_leaves_the_old_placement_in_force(ray_serve, tmp_path):
    """The checkpoint goes missing after deployment: the expert replicas cannot read the experts
    they gain, the router abandons the new version with the reason, and requests go on being
    served by the version in force."""
    model = make_model(tmp_path / "hot01", "tiny", seed=0, hot_experts={0: 1.0, 1: 1.0})
    deploy(ServeConfig(model=str(model), expert_groups=2, redundant_experts=2, rebalance_threshold=0,
                       dtype="float32", kv_cache_memory=64 << 20, snapshot_refresh_s=0.5, heartbeat_interval_s=0.3),
           ray_serve)
    try:
        want = [generate(ray_serve, p, 8)["token_ids"] for p in prompts(4, seed=3)]
        measured_balancedness(ray_serve, 0)
        weights = sorted(model.glob("*.safetensors"))
        for f in weights:
            f.rename(f.with_suffix(".gone"))
        record = requests.post(f"{ray_serve}/v1/experts/rebalance", timeout=30).json()
        assert record["changed"] and record["version"] == 1
        deadline = time.monotonic() + 60
        while (last := experts(ray_serve)["rebalance"]["last"])["state"] == "loading":
            assert time.monotonic() < deadline, last
            time.sleep(0.2)
        assert last["state"] == "abandoned" and "could not load it" in last["error"]
        assert "CheckpointError" in last["error"] and "no .safetensors file" in last["error"]
        status = experts(ray_serve)["rebalance"]
        assert status["version"] == 0 and status["pending_version"] is None and status["failures"] == 1
        assert [generate(ray_serve, p, 8)["token_ids"] for p in prompts(4, seed=3)] == want
        assert "glm_ray_expert_rebalance_failures_total 1.0" in requests.get(f"{ray_serve}/metrics", timeout=10).text
    finally:
        undeploy()
