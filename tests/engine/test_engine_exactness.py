"""The paged, batched engine against the plain reference forward (no paging, no batching)."""

import pytest
import torch

from glm_ray import LLM, SamplingParams
from glm_ray.engine.config import EngineOptions
from glm_ray.engine.llm_engine import LLMEngine
from glm_ray.model.loader import load_model
from glm_ray.model.reference import greedy_generate, prompt_logits

GREEDY = dict(temperature=0.0, ignore_eos=True)
LENGTHS = [1, 2, 3, 5, 8, 13, 16, 17, 31, 32, 33, 64, 100, 150, 257, 300]


def random_prompts(lengths, seed=0, vocab=1000):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    return load_model(tiny_model_dir, dtype="float32")


def run_staggered(engine, prompts, params, arrivals):
    """Add request i at step arrivals[i]; step until all finish. Returns token ids per request."""
    reqs, step = {}, 0
    while len(reqs) < len(prompts) or engine.has_unfinished():
        for i, at in enumerate(arrivals):
            if at == step and i not in reqs:
                reqs[i] = engine.add_request(f"r{i}", prompts[i], params[i])
        engine.step()
        step += 1
        assert step < 10_000
    return [reqs[i].output().outputs[0].token_ids for i in range(len(prompts))]


def test_staggered_requests_equal_the_reference(tiny_model_dir, reference):
    prompts = random_prompts(LENGTHS)
    max_tokens = [8 + (i * 7) % 25 for i in range(len(prompts))]
    engine = LLMEngine(tiny_model_dir, EngineOptions(dtype="float32", max_num_seqs=6, max_num_batched_tokens=128))
    params = [SamplingParams(max_tokens=m, **GREEDY) for m in max_tokens]
    got = run_staggered(engine, prompts, params, arrivals=[(i * 3) % 11 for i in range(len(prompts))])
    model, experts, _ = reference
    for p, m, g in zip(prompts, max_tokens, got):
        assert g == greedy_generate(model, experts, [p], m)[0]


def test_preemption_under_a_small_kv_budget_keeps_outputs(tiny_model_dir, reference):
    prompts = random_prompts([40, 70, 25, 90, 60, 33, 80, 50], seed=1)
    params = [SamplingParams(max_tokens=40, **GREEDY)] * len(prompts)
    engine = LLMEngine(tiny_model_dir, EngineOptions(dtype="float32", num_kv_blocks=12, block_size=16,
                                                     max_num_seqs=8, max_num_batched_tokens=256))
    got = run_staggered(engine, prompts, params, arrivals=[0] * len(prompts))
    assert engine.scheduler.stats().num_preemptions > 0
    model, experts, _ = reference
    assert got == greedy_generate(model, experts, prompts, 40)
    assert engine.scheduler.block_manager.num_used_blocks == 0  # everything freed


def test_prefix_cache_prefills_a_shared_system_prompt_once(tiny_model_dir, reference):
    system = random_prompts([96], seed=2)[0]
    tails = random_prompts([5, 9, 3, 12], seed=3)
    prompts = [system + t for t in tails]
    params = [SamplingParams(max_tokens=6, **GREEDY)] * len(prompts)
    computed = {}
    for caching in (False, True):
        engine = LLMEngine(tiny_model_dir, EngineOptions(dtype="float32", enable_prefix_caching=caching))
        first = run_staggered(engine, prompts[:1], params[:1], [0])
        rest = run_staggered(engine, prompts[1:], params[1:], [0, 0, 0])
        computed[caching] = engine.scheduler.stats().num_computed_tokens
        model, experts, _ = reference
        assert first + rest == greedy_generate(model, experts, prompts, 6)
        if caching:
            assert engine.scheduler.stats().num_prefix_hit_tokens == 3 * 96
    # three later requests reuse the 96-token prefix (6 full blocks of 16)
    assert computed[False] - computed[True] == 3 * 96


def test_prompt_logprobs_match_the_reference_log_softmax(tiny_model_dir, reference):
    prompts = random_prompts([1, 20, 77], seed=4)
    llm = LLM(tiny_model_dir, dtype="float32", max_num_batched_tokens=32)  # long prompts span chunks
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(max_tokens=1, prompt_logprobs=2, **GREEDY))
    model, experts, _ = reference
    for p, out, logits in zip(prompts, outs, prompt_logits(model, experts, prompts)):
        lp = torch.log_softmax(logits, dim=-1)
        assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(p)
        for i in range(1, len(p)):
            entry = out.prompt_logprobs[i]
            assert p[i] in entry
            assert abs(entry[p[i]].logprob - lp[i - 1, p[i]].item()) <= 1e-4
            top = lp[i - 1].topk(2)
            for rank, (value, tid) in enumerate(zip(top.values.tolist(), top.indices.tolist()), 1):
                assert entry[tid].rank == rank and abs(entry[tid].logprob - value) <= 1e-4


def test_sample_logprobs_are_the_raw_distribution(tiny_model_dir, reference):
    prompt = random_prompts([15], seed=5)[0]
    out = LLM(tiny_model_dir, dtype="float32").generate({"prompt_token_ids": prompt},
                                                         SamplingParams(max_tokens=3, logprobs=3, **GREEDY))[0]
    model, experts, _ = reference
    seq = prompt + out.outputs[0].token_ids
    lp = torch.log_softmax(prompt_logits(model, experts, [seq])[0], dim=-1)
    for k, (tid, entry) in enumerate(zip(out.outputs[0].token_ids, out.outputs[0].logprobs)):
        pos = len(prompt) - 1 + k
        assert entry[tid].rank == 1  # greedy picks the top token
        assert abs(entry[tid].logprob - lp[pos, tid].item()) <= 1e-4
        assert len(entry) == 3
    assert out.outputs[0].cumulative_logprob == pytest.approx(
        sum(e[t].logprob for t, e in zip(out.outputs[0].token_ids, out.outputs[0].logprobs)))


def test_seeded_sampling_is_reproducible_alone_and_in_a_mixed_batch(tiny_model_dir):
    llm = LLM(tiny_model_dir, dtype="float32")
    prompt = {"prompt_token_ids": random_prompts([12], seed=6)[0]}
    seeded = SamplingParams(temperature=0.9, top_p=0.95, seed=1234, max_tokens=24, ignore_eos=True)
    alone = llm.generate(prompt, seeded)[0].outputs[0].token_ids
    others = [{"prompt_token_ids": p} for p in random_prompts([3, 40, 7], seed=7)]
    mixed = llm.generate(others[:2] + [prompt] + others[2:],
                         [SamplingParams(temperature=1.0, max_tokens=30, ignore_eos=True),
                          SamplingParams(temperature=0.7, seed=99, max_tokens=10, ignore_eos=True),
                          seeded,
                          SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)])
    assert mixed[2].outputs[0].token_ids == alone
    other_seed = llm.generate(prompt, SamplingParams(temperature=0.9, top_p=0.95, seed=4321, max_tokens=24,
                                                     ignore_eos=True))[0].outputs[0].token_ids
    assert other_seed != alone
