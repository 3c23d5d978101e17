"""Replicas killed mid-generation (their Ray actors, not mocks). An attention replica: every stream
it carried goes on from another replica, each client reading one continuous stream, token-identical
to an undisturbed run (greedy and seeded), usage counted once. The only replica of an expert group:
steps wait for Serve's replacement, /health says degraded meanwhile, nothing is lost."""

import concurrent.futures as cf
import time

import pytest
import requests

from glm_ray import LLM, SamplingParams
from glm_ray.serving.config import ServeConfig

from .test_serving import deploy, undeploy

openai = pytest.importorskip("openai")

MAX_TOKENS = 400
PROMPTS = ["Once upon a time", "The experts of a MoE layer", "1 2 3 4 5 6", "Dear reader,", "GLM says", "Hello"]
SEEDED = {1: 5, 4: 77}  # prompt index -> seed (temperature 0.9); the rest greedy


def params_of(i):
    if i in SEEDED:
        return dict(temperature=0.9, top_p=0.95, seed=SEEDED[i])
    return dict(temperature=0.0)


def test_streams_survive_the_loss_of_their_attention_replica(ray_serve, tiny_model_dir):
    import ray

    llm = LLM(tiny_model_dir, dtype="float32")
    want = [llm.generate(p, SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True, **params_of(i)))[0].outputs[0]
            for i, p in enumerate(PROMPTS)]
    deploy(ServeConfig(model=str(tiny_model_dir), expert_groups=0, attention_replicas=2, dtype="float32",
                       kv_cache_memory=32 << 20, max_model_len=1024), ray_serve)
    client = openai.OpenAI(base_url=f"{ray_serve}/v1", api_key="unused", max_retries=0)
    try:
        progress = [0] * len(PROMPTS)  # chunks read per stream

        def stream(i):
            text, token_count, usage, finish = "", 0, None, None
            for chunk in client.completions.create(
                    model=tiny_model_dir.name, prompt=PROMPTS[i], max_tokens=MAX_TOKENS, stream=True,
                    stream_options={"include_usage": True}, extra_body={"ignore_eos": True}, **params_of(i)):
                if chunk.choices:
                    text += chunk.choices[0].text
                    finish = chunk.choices[0].finish_reason or finish
                    progress[i] += 1
                usage = chunk.usage or usage
            return text, usage, finish

        with cf.ThreadPoolExecutor(len(PROMPTS)) as pool:
            futures = [pool.submit(stream, i) for i in range(len(PROMPTS))]
            deadline = time.monotonic() + 120
            while min(progress) < 5 and time.monotonic() < deadline:  # every stream is under way
                time.sleep(0.01)
            replicas = [a for a in ray.util.list_named_actors(all_namespaces=True)
                        if "AttentionReplica" in a["name"]]
            assert len(replicas) == 2
            ray.kill(ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"]), no_restart=True)
            unfinished_at_kill = sum(not f.done() for f in futures)
            got = [f.result(timeout=300) for f in futures]
        assert unfinished_at_kill == len(PROMPTS)  # the kill came mid-generation for every stream
        for (text, usage, finish), w, p in zip(got, want, PROMPTS):
            assert text == w.text  # one continuous stream: nothing twice, nothing missing
            assert finish == "length"
            assert usage.completion_tokens == MAX_TOKENS and usage.prompt_tokens == len(llm.tokenizer.encode(p))
        metrics = requests.get(f"{ray_serve}/metrics", timeout=30).text
        resumed = [float(line.split()[-1]) for line in metrics.splitlines()
                   if line.startswith("glm_ray_requests_resumed_total")]
        assert resumed and resumed[0] >= 1  # streams really were cut and continued elsewhere
        # the app serves on (Serve replaces the killed replica meanwhile)
        r = requests.get(f"{ray_serve}/health", timeout=30)
        assert r.status_code == 200
        again = client.completions.create(model=tiny_model_dir.name, prompt=PROMPTS[0], max_tokens=16,
                                          temperature=0, extra_body={"ignore_eos": True})
        assert again.choices[0].text == llm.generate(PROMPTS[0], SamplingParams(
            max_tokens=16, temperature=0, ignore_eos=True))[0].outputs[0].text
    finally:
        undeploy()


def test_steps_wait_for_a_lost_expert_group_and_health_says_degraded(ray_serve, tiny_model_dir):
    """The only replica of an expert group is killed mid-generation: /health turns 503 "degraded"
    naming the group, steps wait (expert_wait_s) until Serve's replacement has loaded its experts,
    and every stream finishes token-identical to an undisturbed run."""
    import ray

    llm = LLM(tiny_model_dir, dtype="float32")
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    want = [o.outputs[0].text for o in llm.generate(PROMPTS[:4], params)]
    deploy(ServeConfig(model=str(tiny_model_dir), expert_groups=2, dtype="float32", kv_cache_memory=32 << 20,
                       max_model_len=1024, expert_wait_s=240), ray_serve)
    client = openai.OpenAI(base_url=f"{ray_serve}/v1", api_key="unused", max_retries=0)
    try:
        progress = [0] * 4

        def stream(i):
            text = ""
            for chunk in client.completions.create(model=tiny_model_dir.name, prompt=PROMPTS[i],
                                                   max_tokens=MAX_TOKENS, temperature=0, stream=True,
                                                   extra_body={"ignore_eos": True}):
                text += chunk.choices[0].text if chunk.choices else ""
                progress[i] += 1
            return text

        with cf.ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(stream, i) for i in range(4)]
            deadline = time.monotonic() + 120
            while min(progress) < 3 and time.monotonic() < deadline:
                time.sleep(0.01)
            victim = [a for a in ray.util.list_named_actors(all_namespaces=True) if "ExpertGroup_1" in a["name"]]
            assert len(victim) == 1
            ray.kill(ray.get_actor(victim[0]["name"], namespace=victim[0]["namespace"]), no_restart=True)
            degraded = None
            deadline = time.monotonic() + 60
            while degraded is None and time.monotonic() < deadline:
                r = requests.get(f"{ray_serve}/health", timeout=30)
                if r.status_code == 503 and "degraded" in r.text:
                    degraded = r.json()["error"]["message"]
                time.sleep(0.2)
            assert not any(f.done() for f in futures)  # the streams were waiting, not failing
            got = [f.result(timeout=300) for f in futures]
        assert degraded is not None and "expert group 1 has had no live replica" in degraded, degraded
        assert got == want
        assert requests.get(f"{ray_serve}/health", timeout=30).status_code == 200  # the replacement is in
    finally:
        undeploy()
