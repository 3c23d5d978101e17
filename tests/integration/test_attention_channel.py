"""The ingress <-> attention replica channel over real gRPC on 127.0.0.1 (no Ray): outputs equal
`LLM`'s, a step's deltas of many requests travel as one message, a client that leaves aborts its
request and frees its KV blocks, a draining replica's requests go elsewhere, streams of a replica
that is lost or reaches its drain limit resume on another (token-identical, greedy and seeded),
with no other replica the drain limit ends a generation with a retryable error, and a caller
without the cluster secret gets nothing."""

import asyncio
import time

import pytest

from glm_ray import LLM, SamplingParams
from glm_ray.engine.async_engine import AsyncLLMEngine
from glm_ray.engine.config import EngineOptions
from glm_ray.experts.auth import DispatchAuth
from glm_ray.experts.remote import EventLoopThread
from glm_ray.serving.attention_channel import AttentionChannelServer
from glm_ray.serving.attention_links import AttentionLinks, AttentionUnavailable

SECRET = "attention-channel-test-secret"
OPTIONS = dict(dtype="float32", max_model_len=512, kv_cache_memory=16 << 20)
PROMPTS = [[5, 9, 11], [300, 2], [7] * 9, [40, 41, 42, 43], [900, 1, 2, 3, 4, 5], [12] * 20, [77, 78], [501]]


class Replica:
    def __init__(self, model_dir, secret=SECRET):
        self.engine = AsyncLLMEngine(model_dir, EngineOptions(**OPTIONS))
        self.server = AttentionChannelServer(self.engine, DispatchAuth(secret=secret))
        self.loop = EventLoopThread("test-attention-channel")
        self.address = self.loop.run(self.server.start())

    def free_blocks(self):
        return self.engine.engine.scheduler.stats().num_free_blocks

    def close(self):
        self.loop.run(self.server.stop(0))
        self.loop.stop()
        self.engine.shutdown()


@pytest.fixture(scope="module")
def replicas(tiny_model_dir):
    pair = [Replica(tiny_model_dir), Replica(tiny_model_dir)]
    yield pair
    for r in pair:
        r.close()


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    return LLM(tiny_model_dir, **OPTIONS)


def links_to(*replicas, secret=SECRET, wait_s=5.0):
    async def table():
        return {f"r{i}": r.address for i, r in enumerate(replicas)}
    return AttentionLinks(table, DispatchAuth(secret=secret), refresh_s=0.2, wait_s=wait_s)


def request(i, prompt, max_tokens, stream=True):
    return {"request_id": f"req-{i}", "prompt_token_ids": prompt, "stream": stream,
            "sampling_params": {"temperature": 0.0, "max_tokens": max_tokens, "ignore_eos": True}}


async def collect(links, req):
    deltas = [d async for d in links.generate(req)]
    return deltas, [t for d in deltas for t in d["token_ids"]]


def test_outputs_equal_llm_and_steps_are_coalesced(replicas, reference):
    one = replicas[0]
    before = one.server.num_messages

    async def main():
        links = links_to(one)
        try:
            return await asyncio.gather(*(collect(links, request(i, p, 16)) for i, p in enumerate(PROMPTS)),
                                        collect(links, request(99, PROMPTS[0], 16, stream=False)))
        finally:
            await links.close()

    results = asyncio.run(main())
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    want = reference.generate([{"prompt_token_ids": p} for p in PROMPTS + [PROMPTS[0]]], params)
    for (deltas, ids), w in zip(results, want):
        assert ids == w.outputs[0].token_ids
        assert deltas[-1]["finish_reason"] == "length" and deltas[-1]["num_output_tokens"] == 16
    assert len(results[-1][0]) == 1  # a whole request: one delta
    num_deltas = sum(len(d) for d, _ in results)
    messages = one.server.num_messages - before
    assert messages < num_deltas / 3, (messages, num_deltas)  # one message a step for all requests, not one each


def test_a_client_that_leaves_aborts_and_frees_the_kv_cache(replicas):
    one = replicas[0]
    baseline = one.free_blocks()

    async def main():
        links = links_to(one)
        stream = links.generate(request(1, [3] * 40, 400))
        got = [await stream.__anext__() for _ in range(2)]
        await stream.aclose()  # the HTTP client went away
        for _ in range(100):
            if one.server.running() == 0 and one.free_blocks() == baseline:
                break
            await asyncio.sleep(0.05)
        await links.close()
        return got

    got = asyncio.run(main())
    assert got and got[-1]["finish_reason"] is None
    assert one.server.running() == 0 and one.free_blocks() == baseline


def test_a_draining_replica_hands_new_requests_to_another(replicas, reference):
    draining, other = replicas
    draining.server.draining = True
    served_before = other.server.num_messages
    try:
        async def main():
            links = links_to(draining, other)
            try:
                return await asyncio.gather(*(collect(links, request(i, p, 8)) for i, p in enumerate(PROMPTS[:4])))
            finally:
                await links.close()

        results = asyncio.run(main())
    finally:
        draining.server.draining = False
    want = reference.generate([{"prompt_token_ids": p} for p in PROMPTS[:4]],
                              SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    assert [ids for _, ids in results] == [w.outputs[0].token_ids for w in want]
    assert other.server.num_messages > served_before


def test_the_drain_limit_with_no_other_replica_ends_a_generation_with_a_retryable_error(replicas):
    one = replicas[0]

    async def main():
        links = links_to(one, wait_s=1.0)
        stream = links.generate(request(2, [8] * 10, 400))
        first = await stream.__anext__()
        one.loop.run(one.server.fail_all("the replica stopped at its drain limit"), timeout=10)
        with pytest.raises(AttentionUnavailable, match="no attention replica took the request.*drain limit"):
            async for _ in stream:
                pass
        await links.close()
        return first

    assert asyncio.run(main())["token_ids"]
    assert one.server.running() == 0


SEEDED = {"temperature": 0.9, "top_p": 0.95, "seed": 11, "max_tokens": 300, "ignore_eos": True}


def _cut_and_resume(reference, first, second, cut):
    """Five streams (four greedy, one seeded) start on `first` alone; after each has sent two
    deltas, `second` joins the table and `cut(first)` ends the first's part. Each stream must
    read on as one: the tokens of an undisturbed run, the last delta counting them all."""
    reqs = [request(10 + i, p, 300) for i, p in enumerate(PROMPTS[:4])]
    reqs.append({**request(20, PROMPTS[4], 300), "sampling_params": SEEDED})

    async def main():
        table = {"first": first.address}

        async def source():
            return dict(table)

        links = AttentionLinks(source, DispatchAuth(secret=SECRET), refresh_s=0.2, wait_s=10.0)
        streams = [links.generate(r) for r in reqs]
        got, last = [[] for _ in reqs], [None] * len(reqs)
        for i, stream in enumerate(streams):
            for _ in range(2):
                got[i] += (await stream.__anext__())["token_ids"]
        at_cut = [len(g) for g in got]
        table["second"] = second.address
        await asyncio.to_thread(cut, first)
        for i, stream in enumerate(streams):
            async for d in stream:
                got[i] += d["token_ids"]
                last[i] = d
        await links.close()
        assert links.resumed == len(reqs)
        return got, last, at_cut

    got, last, at_cut = asyncio.run(main())
    want = reference.generate([{"prompt_token_ids": r["prompt_token_ids"]} for r in reqs],
                              [SamplingParams(temperature=0.0, max_tokens=300, ignore_eos=True)] * 4
                              + [SamplingParams(**SEEDED)])
    assert all(n < 300 for n in at_cut)  # every stream was cut mid-generation
    for g, d, w in zip(got, last, want):
        assert g == w.outputs[0].token_ids  # nothing twice, nothing missing, same tokens
        assert d["finish_reason"] == "length" and d["num_output_tokens"] == 300


def test_streams_of_a_lost_replica_resume_on_another(tiny_model_dir, reference):
    first, second = Replica(tiny_model_dir), Replica(tiny_model_dir)
    try:
        _cut_and_resume(reference, first, second, lambda r: r.loop.run(r.server.stop(0), timeout=10))
        assert second.server.num_messages > 0
    finally:
        first.close()
        second.close()


def test_streams_past_the_drain_limit_resume_on_another(tiny_model_dir, reference):
    first, second = Replica(tiny_model_dir), Replica(tiny_model_dir)
    try:
        _cut_and_resume(reference, first, second,
                        lambda r: r.loop.run(r.server.fail_all("the replica stopped at its drain limit"), timeout=10))
        assert first.server.running() == 0
        for _ in range(100):
            if first.engine.num_running() == 0:
                break
            time.sleep(0.05)
        assert first.engine.num_running() == 0  # its part was aborted there, KV freed
    finally:
        first.close()
        second.close()


def test_without_the_cluster_secret_nothing_runs(replicas):
    one = replicas[0]
    before = one.server.num_messages

    async def main():
        links = links_to(one, secret="not-the-cluster-secret", wait_s=1.0)
        try:
            # refused at the interceptor; the client names the secret when the call's status reads
            # UNAUTHENTICATED (a racing write can turn it into INTERNAL: then it fails all the same)
            with pytest.raises(AttentionUnavailable, match="cluster secrets differ|INTERNAL"):
                await collect(links, request(3, [1, 2, 3], 4))
        finally:
            await links.close()

    asyncio.run(main())
    assert one.server.num_messages == before and one.server.running() == 0
