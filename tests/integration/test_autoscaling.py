"""Autoscaling on the local Ray cluster, with a model whose routing sends every token to group 0
(a correction bias on experts 0-3): under load, expert group 0 and the attention deployment go from
1 to 2 replicas while group 1 (no tokens) stays at 1; when the load falls, both come back to 1.
Every greedy output, including those of requests in flight while replicas started and drained,
equals the in-process `LLM`'s. The one permitted failure: a generation still running on an
attention replica when its drain limit (`attention_drain_s`) runs out ends with a retryable 503
(Retry-After), never a silent cut."""

import random
import threading
import time

import grpc
import pytest
import requests

from glm_ray import LLM, SamplingParams
from glm_ray.experts.auth import SECRET_METADATA_KEY
from glm_ray.model.synthetic import make_model
from glm_ray.serving.config import ServeConfig
from glm_ray.v1 import experts_pb2 as epb
from glm_ray.v1 import experts_pb2_grpc as epb_grpc

from .test_serving import APP, deploy, undeploy

SECRET = "autoscaling-test-secret-0123456789"
PROMPTS = [[11, 400, 7, 93], [5, 5, 81, 600, 2, 19, 44], [300], [17, 29, 31, 37, 41, 43, 47, 53, 59],
           [1000, 2, 900, 3], [64, 128, 256, 512, 768]]
HEAVY_TOKENS, LONG_TOKENS, LIGHT_TOKENS = 24, 300, 4


@pytest.fixture(scope="module")
def skewed_model(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("models") / "skewed", "tiny", seed=0,
                      hot_experts={e: 1.0 for e in range(4)})


@pytest.fixture(scope="module")
def reference(skewed_model):
    llm = LLM(skewed_model, dtype="float32")
    out = {}
    for n in (HEAVY_TOKENS, LONG_TOKENS, LIGHT_TOKENS):
        params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
        for prompt, result in zip(PROMPTS, llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params)):
            out[(tuple(prompt), n)] = list(result.outputs[0].token_ids)
    return out


class Watch(threading.Thread):
    """Replicas per deployment (Serve's view), /health, and group 0's addresses (the router's), every
    0.25 s; every address the router lists is asked for its experts at once: a replica is in the
    table only with its weights loaded."""

    def __init__(self, base_url):
        super().__init__(daemon=True)
        self.base_url, self.samples, self.addresses, self.problems = base_url, [], set(), []
        self.halt = threading.Event()

    def running(self, name: str) -> int:
        return self.samples[-1][1].get(name, 0) if self.samples else 0

    def most(self, name: str) -> int:
        return max((s.get(name, 0) for _, s in self.samples), default=0)

    def run(self):
        from ray import serve

        while not self.halt.wait(0.25):
            try:
                deployments = serve.status().applications[APP].deployments
                counts = {n: sum(v for k, v in d.replica_states.items() if str(getattr(k, "value", k)) == "RUNNING")
                          for n, d in deployments.items()}
                self.samples.append((time.monotonic(), counts))
                health = requests.get(f"{self.base_url}/health", timeout=10)
                if health.status_code != 200:  # a replica starting or draining must not make it flap
                    self.problems.append(f"/health {health.status_code}: {health.text[:300]}")
                experts = requests.get(f"{self.base_url}/v1/experts", timeout=10).json()
            except Exception as e:  # noqa: BLE001 - recorded, the test fails on it
                self.problems.append(repr(e))
                continue
            for address in set(experts["replicas"]["0"]) - self.addresses:
                self.addresses.add(address)
                with grpc.insecure_channel(address) as channel:
                    info = epb_grpc.ExpertServiceStub(channel).Info(
                        epb.InfoRequest(), metadata=[(SECRET_METADATA_KEY, SECRET)], timeout=10)
                if list(info.expert_ids) != [0, 1, 2, 3] or not info.num_parameters:
                    self.problems.append(f"{address} in the table without its experts: {info}")
            self.group0_load = experts.get("replica_load", {})


class Load:
    """Client threads sending greedy /v1/generate requests; every answer is kept."""

    def __init__(self, base_url):
        self.base_url, self.results, self.errors, self.retryable = base_url, [], [], []
        self.threads, self.halt = [], threading.Event()

    def start(self, clients: int, max_tokens: int, pause_s: float = 0.0):
        halt = self.halt = threading.Event()

        def client(seed):
            rng = random.Random(seed)
            while not halt.is_set():
                prompt = rng.choice(PROMPTS)
                try:
                    r = requests.post(f"{self.base_url}/v1/generate", timeout=120, json=dict(
                        prompt_token_ids=prompt, max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
                    if r.status_code == 503 and r.headers.get("retry-after") and "retry" in r.text:
                        self.retryable.append(r.json()["error"]["message"])  # cut at a drain limit
                    elif r.status_code != 200:
                        self.errors.append(f"{r.status_code} {r.text[:300]}")
                    else:
                        self.results.append(((tuple(prompt), max_tokens), r.json()["token_ids"]))
                except requests.RequestException as e:
                    self.errors.append(repr(e))
                halt.wait(pause_s)

        self.threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
        for t in self.threads:
            t.start()

    def stop(self):
        self.halt.set()
        for t in self.threads:
            t.join(timeout=120)


def wait_until(condition, timeout_s: float, what: str, watch: Watch):
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"{what} did not happen in {timeout_s:.0f} s: {watch.samples[-3:]}"
        time.sleep(0.25)


def test_expert_groups_and_attention_scale_with_load(ray_serve, skewed_model, reference):
    cfg = ServeConfig(
        model=str(skewed_model), served_model_name="skewed", expert_groups=2, dtype="float32",
        kv_cache_memory=16 << 20, max_model_len=512, cluster_secret=SECRET, snapshot_refresh_s=0.5,
        heartbeat_interval_s=0.25, autoscaling_metrics_interval_s=0.5, attention_drain_s=2,
        # any load keeps group 0's replicas ~15-20% busy here, idle is 0: a low target tells them apart
        expert_autoscaling=dict(min_replicas=1, max_replicas=2, target_busy=0.05, upscale_delay_s=1,
                                downscale_delay_s=3, look_back_s=2),
        attention_autoscaling=dict(min_replicas=1, max_replicas=2, target_sequences=4, upscale_delay_s=1,
                                   downscale_delay_s=3, look_back_s=2))
    deploy(cfg, ray_serve)
    watch, load = Watch(ray_serve), Load(ray_serve)
    watch.start()
    try:
        wait_until(lambda: watch.samples, 30, "the first status", watch)
        assert watch.running("ExpertGroup_0") == watch.running("ExpertGroup_1") == 1
        assert watch.running("AttentionReplica") == 1

        # heavy: 12 streams at once, ~0.2 of group 0 busy and 12 sequences against a target of 4
        load.start(clients=12, max_tokens=HEAVY_TOKENS)
        wait_until(lambda: watch.running("ExpertGroup_0") == 2 and watch.running("AttentionReplica") == 2, 120,
                   "scale-up of group 0 and the attention replicas", watch)
        wait_until(lambda: len(watch.addresses) == 2 and all(
            watch.group0_load.get(a, {}).get("tokens_per_s", 0) > 0 for a in watch.addresses), 60,
            "both group 0 replicas computing", watch)
        load.stop()

        # long: 4 generations of 300 tokens (~4 s each), 4 sequences in all: the attention deployment wants 1
        # replica and drains the other, whose generations have 2 s to finish (attention_drain_s)
        load.start(clients=4, max_tokens=LONG_TOKENS)
        wait_until(lambda: watch.running("AttentionReplica") == 1, 120, "scale-down of the attention replicas", watch)
        load.stop()

        # light: one short request every 1.5 s, far under every target, still in flight while group 0 drains
        load.start(clients=1, max_tokens=LIGHT_TOKENS, pause_s=1.5)
        wait_until(lambda: watch.running("ExpertGroup_0") == 1 and watch.running("AttentionReplica") == 1, 120,
                   "scale-down of group 0", watch)
        time.sleep(3)  # requests go on after the drained replicas left
        load.stop()
    finally:
        load.stop()
        watch.halt.set()
        watch.join(timeout=30)
        undeploy()

    assert not load.errors, load.errors[:5]
    assert all("retry" in m for m in load.retryable)  # at most the generations cut at the drain limit
    assert len(load.retryable) <= 4
    assert not watch.problems, watch.problems[:5]
    assert watch.most("ExpertGroup_1") == 1  # no tokens, no second replica
    assert watch.most("ExpertGroup_0") == 2 and watch.most("AttentionReplica") == 2
    assert sum(1 for key, _ in load.results if key[1] == LIGHT_TOKENS) >= 3
    assert len(load.results) > 50
    for key, token_ids in load.results:
        assert token_ids == reference[key], key
