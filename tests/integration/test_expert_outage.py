"""An expert group with no live replica, over real gRPC (no Ray): a step waits for one up to the
limit; past it only the requests in the running batch fail, with the step's error; queued ones
stay queued and finish, token-identical, once a replica is back."""

import asyncio

from glm_ray import LLM, SamplingParams
from glm_ray.config import load_model_config
from glm_ray.engine.async_engine import AsyncLLMEngine, EngineStepError
from glm_ray.engine.config import EngineOptions
from glm_ray.experts.remote import EventLoopThread, RemoteExperts, StaticReplicas
from glm_ray.experts.server import ExpertServer
from glm_ray.model.loader import load_weights
from glm_ray.router.placement import Placement

PROMPTS = [[5, 9, 11], [300, 2], [7] * 9, [40, 41, 42, 43]]


def test_past_the_wait_only_running_requests_fail_and_queued_ones_finish(tiny_model_dir):
    config = load_model_config(tiny_model_dir)
    placement = Placement.contiguous(config.n_routed_experts, 2)
    loop = EventLoopThread("outage-test-servers")
    servers = [ExpertServer(load_weights(tiny_model_dir, dtype="float32", dense=False,
                                         expert_ids=placement.experts_of(g)).experts, g) for g in range(2)]
    replicas = StaticReplicas({0: [loop.run(servers[0].start())], 1: []})  # group 1 is down
    remote = RemoteExperts(placement, replicas, unavailable_wait_s=2.0, poll_s=0.02)
    engine = AsyncLLMEngine(tiny_model_dir, EngineOptions(dtype="float32", max_num_seqs=2, max_model_len=256,
                                                          kv_cache_memory=16 << 20), experts=remote)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    want = LLM(tiny_model_dir, dtype="float32").generate([{"prompt_token_ids": p} for p in PROMPTS], params)

    async def one(i):
        tokens = []
        async for delta in engine.generate(f"r{i}", PROMPTS[i], params):
            tokens += delta.new_token_ids
        return tokens

    async def main():
        tasks = [asyncio.ensure_future(one(i)) for i in range(4)]
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED, timeout=60)
        assert done, "no request failed within the wait"
        # the first failures are in: bring group 1 back while the queued requests wait for it
        replicas.set(1, [loop.run(servers[1].start())])
        return await asyncio.gather(*tasks, return_exceptions=True)

    try:
        results = asyncio.run(main())
    finally:
        remote.close()
        engine.shutdown()
        for s in servers:
            loop.run(s.stop(None))
        loop.stop()
    failed = [r for r in results if isinstance(r, BaseException)]
    assert len(failed) == 2  # the running batch (max_num_seqs 2) and nothing else
    assert all(isinstance(e, EngineStepError) and "ExpertUnavailableError" in str(e) and "group 1" in str(e)
               for e in failed)
    finished = [(r, w.outputs[0].token_ids) for r, w in zip(results, want) if not isinstance(r, BaseException)]
    assert len(finished) == 2 and all(got == ids for got, ids in finished)

