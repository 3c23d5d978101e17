"""The disaggregated app on a local Ray cluster: exactness, weight placement, replica failure."""

import asyncio
import concurrent.futures as cf
import time

import pytest
import requests
import torch

from glm_ray import LLM, SamplingParams
from glm_ray.serving.app import build_app
from glm_ray.serving.config import ServeConfig

APP = "glm-ray"


def deploy(cfg: ServeConfig, base_url: str, timeout=180):
    from ray import serve

    serve.run(build_app(cfg), name=APP, route_prefix="/")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = requests.get(f"{base_url}/health", timeout=10)
        if r.status_code == 200:
            return
        time.sleep(0.5)
    raise AssertionError(f"app not healthy: {r.text}")


def undeploy():
    from ray import serve

    serve.delete(APP)


def prompts(n=16, seed=0, vocab=1000):
    g = torch.Generator().manual_seed(seed)
    lengths = [1 + (i * 37) % 120 for i in range(n)]
    return [torch.randint(0, vocab, (k,), generator=g).tolist() for k in lengths]


def post(base_url, body):
    r = requests.post(f"{base_url}/v1/generate", json=body, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()


def generate_all(base_url, batch, max_tokens, prompt_logprobs=None):
    bodies = [dict(prompt_token_ids=p, temperature=0.0, max_tokens=max_tokens, ignore_eos=True,
                   prompt_logprobs=prompt_logprobs) for p in batch]
    with cf.ThreadPoolExecutor(len(bodies)) as pool:  # all 16 in flight at once
        return list(pool.map(lambda b: post(base_url, b), bodies))


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    llm = LLM(tiny_model_dir, dtype="float32")
    batch = prompts()
    outs = llm.generate([{"prompt_token_ids": p} for p in batch],
                        SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, prompt_logprobs=1))
    return batch, outs


@pytest.mark.parametrize("groups, attention", [(1, 1), (2, 2), (3, 1)])
def test_distributed_equals_in_process(ray_serve, tiny_model_dir, reference, groups, attention):
    batch, want = reference
    deploy(ServeConfig(model=str(tiny_model_dir), expert_groups=groups, attention_replicas=attention,
                       dtype="float32", kv_cache_memory=64 << 20), ray_serve)
    try:
        got = generate_all(ray_serve, batch, 12, prompt_logprobs=1)
        for g, w in zip(got, want):
            assert g["token_ids"] == w.outputs[0].token_ids
            assert g["text"] == w.outputs[0].text
            assert g["finish_reason"] == "length" and g["usage"]["completion_tokens"] == 12
            for pos, entry in enumerate(w.prompt_logprobs[1:], 1):
                tid = str(w.prompt_token_ids[pos])
                assert abs(g["prompt_logprobs"][pos][tid]["logprob"] - entry[int(tid)].logprob) <= 1e-4
    finally:
        undeploy()


def test_two_ingress_replicas_serve_exactly_and_each_admits(ray_serve, tiny_model_dir, reference):
    """`ingress_replicas: 2`: both replicas run, the HTTP proxy spreads requests over them, and
    outputs stay equal to the in-process engine's."""
    from ray import serve

    batch, want = reference
    deploy(ServeConfig(model=str(tiny_model_dir), expert_groups=1, ingress_replicas=2, dtype="float32",
                       kv_cache_memory=64 << 20), ray_serve)
    try:
        ingress = serve.status().applications[APP].deployments["Ingress"]
        states = {str(getattr(state, "value", state)): n for state, n in ingress.replica_states.items()}
        assert states.get("RUNNING") == 2, states
        got = generate_all(ray_serve, batch, 12)
        assert [g["token_ids"] for g in got] == [w.outputs[0].token_ids for w in want]
    finally:
        undeploy()


def test_colocated_equals_in_process(ray_serve, tiny_model_dir, reference):
    """`expert_groups: 0`: no expert deployment, every routed expert inside the attention replica,
    the same front end, router statistics and outputs."""
    from ray import serve

    batch, want = reference
    deploy(ServeConfig(model=str(tiny_model_dir), expert_groups=0, dtype="float32", kv_cache_memory=64 << 20),
           ray_serve)
    try:
        got = generate_all(ray_serve, batch, 12)
        assert [g["token_ids"] for g in got] == [w.outputs[0].token_ids for w in want]
        deployments = serve.status().applications[APP].deployments
        assert not any(name.startswith("ExpertGroup_") for name in deployments)
        resident = serve.get_deployment_handle("AttentionReplica", app_name=APP).resident.remote().result()
        assert resident["local_expert_params"] == 8 * 3 * (3 * 32 * 64)  # 8 experts, 3 MoE layers, here
        deadline = time.monotonic() + 10  # routing counts reach the router with its next table refresh
        while not (tokens := requests.get(f"{ray_serve}/v1/experts", timeout=10).json()["tokens_per_expert"]):
            assert time.monotonic() < deadline, "no routing statistics"
            time.sleep(0.2)
        assert sum(sum(per_expert) for per_expert in tokens.values()) > 0
        assert requests.get(f"{ray_serve}/health", timeout=10).status_code == 200
    finally:
        undeploy()


def test_small_preset_distributed_equals_in_process(ray_serve, tmp_path_factory):
    from glm_ray.model.synthetic import make_model

    model_dir = make_model(tmp_path_factory.mktemp("small") / "small", "small", seed=1)
    batch = prompts(8, seed=9)
    want = LLM(model_dir, dtype="float32").generate(
        [{"prompt_token_ids": p} for p in batch], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    deploy(ServeConfig(model=str(model_dir), expert_groups=2, dtype="float32", kv_cache_memory=64 << 20), ray_serve)
    try:
        got = generate_all(ray_serve, batch, 8)  # non-streamed: each in one message from the replica
        assert [g["token_ids"] for g in got] == [w.outputs[0].token_ids for w in want]
        from ray import serve

        handle = serve.get_deployment_handle("AttentionReplica", app_name=APP).options(stream=True)
        req = {"prompt_token_ids": batch[0], "sampling_params": {"temperature": 0.0, "max_tokens": 8,
                                                                 "ignore_eos": True}}
        whole = list(handle.generate.remote({**req, "stream": False}))
        streamed = list(handle.generate.remote(req))
        assert len(whole) == 1 and len(streamed) > 1
        assert whole[0]["token_ids"] == [t for d in streamed for t in d["token_ids"]] == want[0].outputs[0].token_ids
        assert len(whole[0]["metrics"]["token_times"]) == 8

        # the bench's client (`glm-ray bench --distributed`): whole requests time tokens by the engine
        from glm_ray.bench.distributed import _stream_all
        from glm_ray.bench.workloads import Workload

        workload = Workload("t", "four of the batch", 0, tuple(map(tuple, batch[:4])), (8,) * 4)
        for stream in (False, True):
            t0 = time.monotonic()
            runs = asyncio.run(_stream_all(handle, workload, t0, stream))
            elapsed = time.monotonic() - t0
            for (times, ids), w in zip(runs, want):
                assert ids == w.outputs[0].token_ids
                assert len(times) == 8 and times == sorted(times) and 0 < times[0] and times[-1] <= elapsed
    finally:
        undeploy()


def test_weight_placement(ray_serve, tiny_model_dir):
    from ray import serve

    deploy(ServeConfig(model=str(tiny_model_dir), expert_groups=3, dtype="float32", kv_cache_memory=16 << 20),
           ray_serve)
    try:
        per_expert = 3 * 32 * 64  # gate + up + down of one tiny expert
        moe_layers = 3
        ranges = [[0, 1, 2], [3, 4, 5], [6, 7]]  # contiguous, uneven
        for g, experts in enumerate(ranges):
            info = serve.get_deployment_handle(f"ExpertGroup_{g}", app_name=APP).info.remote().result()
            assert info["expert_ids"] == experts
            assert info["num_params"] == len(experts) * moe_layers * per_expert
            read_experts = {int(n.split(".experts.")[1].split(".")[0]) for n in info["read_names"]}
            assert read_experts == set(experts)  # read nothing else from disk
            assert all(".experts." in n for n in info["read_names"])
        resident = serve.get_deployment_handle("AttentionReplica", app_name=APP).resident.remote().result()
        assert resident["routed_expert_params"] == 0
        assert not any(".experts." in n and "shared_experts" not in n for n in resident["parameter_names"])
        assert any("shared_experts" in n for n in resident["parameter_names"])
    finally:
        undeploy()


def test_killing_one_of_two_replicas_mid_stream(ray_serve, tiny_model_dir):
    import json

    import ray

    batch = prompts(seed=5)
    want = LLM(tiny_model_dir, dtype="float32").generate(
        [{"prompt_token_ids": p} for p in batch], SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True))
    deploy(ServeConfig(model=str(tiny_model_dir), expert_groups=2, expert_replicas=[2, 1], dtype="float32",
                       kv_cache_memory=64 << 20), ray_serve)
    try:
        def stream(p, started):
            body = dict(prompt_token_ids=p, temperature=0.0, max_tokens=48, ignore_eos=True, stream=True)
            tokens = []
            with requests.post(f"{ray_serve}/v1/generate", json=body, stream=True, timeout=300) as r:
                assert r.status_code == 200
                for line in r.iter_lines():
                    delta = json.loads(line)
                    assert "error" not in delta, delta
                    tokens += delta["token_ids"]
                    started.append(1)
            return tokens

        started: list = []
        with cf.ThreadPoolExecutor(len(batch)) as pool:
            futures = [pool.submit(stream, p, started) for p in batch]
            while len(started) < 3 * len(batch):  # every request is streaming
                time.sleep(0.02)
            victims = [a for a in ray.util.list_named_actors(all_namespaces=True) if "ExpertGroup_0" in a["name"]]
            assert len(victims) == 2
            ray.kill(ray.get_actor(victims[0]["name"], namespace=victims[0]["namespace"]), no_restart=True)
            got = [f.result(timeout=300) for f in futures]
        assert got == [w.outputs[0].token_ids for w in want]
        from ray import serve

        stats = serve.get_deployment_handle("AttentionReplica", app_name=APP).dispatch_stats.remote().result()
        assert stats["retries"] >= 1  # calls did fail over to the surviving replica
    finally:
        undeploy()
