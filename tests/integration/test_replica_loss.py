"""Replicas killed mid-generation (their Ray actors, not mocks). An attention replica: every stream
it carried goes on from another replica, each client reading one continuous stream, token-identical
to an undisturbed run (greedy and seeded), usage counted once. The only replica of an expert group:
steps wait for Serve's replacement, /health says degraded meanwhile, nothing is lost. The router:
dispatch goes on from cached tables and everything it knew comes back."""

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


def params_of(i, seeded=True):
    if seeded and i in SEEDED:
        return dict(temperature=0.9, top_p=0.95, seed=SEEDED[i])
    return dict(temperature=0.0)


def kill(name_part: str) -> None:
    """Kill the one actor whose name holds `name_part` (as a crash would: no restart by Ray)."""
    import ray

    actors = [a for a in ray.util.list_named_actors(all_namespaces=True) if name_part in a["name"]]
    assert len(actors) >= 1, name_part
    ray.kill(ray.get_actor(actors[0]["name"], namespace=actors[0]["namespace"]), no_restart=True)


def attention_sequences(base_url) -> dict[str, float]:
    """{attention replica id: sequences} as the router last heard from each replica (/metrics)."""
    metrics = requests.get(f"{base_url}/metrics", timeout=30).text
    return {line.split('replica="', 1)[1].split('"', 1)[0]: float(line.split()[-1])
            for line in metrics.splitlines() if line.startswith("glm_ray_attention_sequences{")}


def wait_for_attention_replicas(base_url, n, timeout_s=60) -> None:
    """Until the router knows `n` attention replicas' channels, and the ingress has re-read its
    table (every second): requests are then spread over all of them."""
    deadline = time.monotonic() + timeout_s
    while len(attention_sequences(base_url)) < n and time.monotonic() < deadline:
        time.sleep(0.2)
    assert len(attention_sequences(base_url)) == n
    time.sleep(1.5)


def kill_busiest_attention_replica(base_url) -> None:
    """Kill the attention replica the router last saw carrying the most sequences."""
    deadline = time.monotonic() + 10
    while not any((load := attention_sequences(base_url)).values()) and time.monotonic() < deadline:
        time.sleep(0.05)  # replicas report their load every snapshot_refresh_s
    kill(max(load, key=load.get))


def stream_through(base_url, model, prompts, seeded, during):
    """Stream every prompt at once; when each has read a few chunks, call `during()` (the kill).
    Returns ([(text, usage, finish reason)], what during returned, streams unfinished when it ran)."""
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)
    progress = [0] * len(prompts)

    def stream(i):
        text, usage, finish = "", None, None
        for chunk in client.completions.create(
                model=model, prompt=prompts[i], max_tokens=MAX_TOKENS, stream=True,
                stream_options={"include_usage": True}, extra_body={"ignore_eos": True}, **params_of(i, seeded)):
            if chunk.choices:
                text += chunk.choices[0].text
                finish = chunk.choices[0].finish_reason or finish
                progress[i] += 1
            usage = chunk.usage or usage
        return text, usage, finish

    with cf.ThreadPoolExecutor(len(prompts)) as pool:
        futures = [pool.submit(stream, i) for i in range(len(prompts))]
        deadline = time.monotonic() + 120
        while min(progress) < 5 and time.monotonic() < deadline:  # every stream is under way
            time.sleep(0.01)
        unfinished = sum(not f.done() for f in futures)
        seen = during()
        unfinished = min(unfinished, sum(not f.done() for f in futures))
        return [f.result(timeout=300) for f in futures], seen, unfinished


def wait_healthy(base_url, timeout_s=90) -> int:
    deadline = time.monotonic() + timeout_s
    while (status := requests.get(f"{base_url}/health", timeout=30).status_code) != 200 and \
            time.monotonic() < deadline:
        time.sleep(0.5)
    return status


def test_streams_survive_the_loss_of_their_attention_replica(ray_serve, tiny_model_dir):
    llm = LLM(tiny_model_dir, dtype="float32")
    want = [llm.generate(p, SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True, **params_of(i)))[0].outputs[0]
            for i, p in enumerate(PROMPTS)]
    deploy(ServeConfig(model=str(tiny_model_dir), expert_groups=0, attention_replicas=2, dtype="float32",
                       kv_cache_memory=32 << 20, max_model_len=1024), ray_serve)
    try:
        wait_for_attention_replicas(ray_serve, 2)
        got, _, unfinished = stream_through(ray_serve, tiny_model_dir.name, PROMPTS, True,
                                            lambda: kill_busiest_attention_replica(ray_serve))
        assert unfinished == len(PROMPTS)  # the kill came mid-generation for every stream
        for (text, usage, finish), w, p in zip(got, want, PROMPTS):
            assert text == w.text  # one continuous stream: nothing twice, nothing missing
            assert finish == "length"
            assert usage.completion_tokens == MAX_TOKENS and usage.prompt_tokens == len(llm.tokenizer.encode(p))
        metrics = requests.get(f"{ray_serve}/metrics", timeout=30).text
        resumed = [float(line.split()[-1]) for line in metrics.splitlines()
                   if line.startswith("glm_ray_requests_resumed_total")]
        assert resumed and resumed[0] >= 1  # streams really were cut and continued elsewhere
        # the app serves on (Serve replaces the killed replica meanwhile)
        assert wait_healthy(ray_serve) == 200
        again = llm.generate(PROMPTS[0], SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))[0]
        client = openai.OpenAI(base_url=f"{ray_serve}/v1", api_key="unused", max_retries=0)
        assert client.completions.create(model=tiny_model_dir.name, prompt=PROMPTS[0], max_tokens=16, temperature=0,
                                         extra_body={"ignore_eos": True}).choices[0].text == again.outputs[0].text
    finally:
        undeploy()


def test_steps_wait_for_a_lost_expert_group_and_health_says_degraded(ray_serve, tiny_model_dir):
    """The only replica of an expert group is killed mid-generation: /health turns 503 "degraded"
    naming the group, steps wait (expert_wait_s) until Serve's replacement has loaded its experts,
    and every stream finishes token-identical to an undisturbed run."""
    llm = LLM(tiny_model_dir, dtype="float32")
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    want = [o.outputs[0].text for o in llm.generate(PROMPTS[:4], params)]
    deploy(ServeConfig(model=str(tiny_model_dir), expert_groups=2, dtype="float32", kv_cache_memory=32 << 20,
                       max_model_len=1024, expert_wait_s=240), ray_serve)

    def kill_and_watch_health():
        kill("ExpertGroup_1")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            r = requests.get(f"{ray_serve}/health", timeout=30)
            if r.status_code == 503 and "degraded" in r.text:
                return r.json()["error"]["message"]
            time.sleep(0.2)
        return None

    try:
        got, degraded, unfinished = stream_through(ray_serve, tiny_model_dir.name, PROMPTS[:4], False,
                                                   kill_and_watch_health)
        assert unfinished == 4  # while /health said degraded the streams were waiting, not failing
        assert degraded is not None and "expert group 1 has had no live replica" in degraded, degraded
        assert [text for text, _, _ in got] == want
        assert wait_healthy(ray_serve) == 200  # the replacement is in
    finally:
        undeploy()


def test_dispatch_goes_on_while_the_router_restarts(ray_serve, tiny_model_dir):
    """The router's actor killed mid-generation: attention replicas dispatch from their cached
    tables, the new router's registry fills again as expert replicas re-register, attention
    replicas re-advertise their channels, and routing statistics resume."""
    llm = LLM(tiny_model_dir, dtype="float32")
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    want = [o.outputs[0].text for o in llm.generate(PROMPTS[:4], params)]
    deploy(ServeConfig(model=str(tiny_model_dir), expert_groups=2, dtype="float32", kv_cache_memory=32 << 20,
                       max_model_len=1024), ray_serve)
    try:
        got, _, unfinished = stream_through(ray_serve, tiny_model_dir.name, PROMPTS[:4], False,
                                            lambda: kill("ExpertRouter"))
        assert unfinished == 4 and [text for text, _, _ in got] == want
        assert wait_healthy(ray_serve) == 200  # the new router knows every group and the attention channel
        client = openai.OpenAI(base_url=f"{ray_serve}/v1", api_key="unused", max_retries=0)
        client.completions.create(model=tiny_model_dir.name, prompt=PROMPTS[0], max_tokens=16, temperature=0,
                                  extra_body={"ignore_eos": True})
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # counts reach the new router with the next reports
            experts = requests.get(f"{ray_serve}/v1/experts", timeout=30).json()
            if sum(sum(c) for c in experts["tokens_per_expert"].values()):
                break
            time.sleep(0.5)
        assert sum(sum(c) for c in experts["tokens_per_expert"].values()) > 0
        assert len(experts["replicas"]) == 2 and all(len(a) == 1 for a in experts["replicas"].values())
    finally:
        undeploy()
