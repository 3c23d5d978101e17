"""PagedAttention against the plain per-sequence definition: block gathers, length buckets, GQA."""

import random

import pytest
import torch

from glm_ray import native
from glm_ray.config import config_from_dict
from glm_ray.engine import decode_attention
from glm_ray.engine.kv_cache import MAX_DECODE_BUCKETS, PagedAttention, PagedKVCache, StepChunk, _split
from glm_ray.model.attention import causal_attention
from glm_ray.model.synthetic import preset_config

HQ, HKV, D, BS = 8, 2, 16, 4


def _config(head_dim=D):
    return config_from_dict(preset_config("tiny", {"num_attention_heads": HQ, "num_key_value_heads": HKV,
                                                   "head_dim": head_dim, "num_hidden_layers": 1}))


@pytest.mark.parametrize("kernel,head_dim", [(True, D), (True, 64), (True, 12), (False, D)],
                         ids=["c-kernel", "c-kernel-d64", "c-kernel-d12", "torch-buckets"])
def test_mixed_step_matches_per_sequence_attention(kernel, head_dim):
    """42 decodes of lengths 1..90, 300 and 1100 (several buckets, or the C kernel, whose online
    softmax then rescales over many chunks), a whole prompt and a continued prompt, with scattered
    blocks: every query row equals causal attention over that sequence's own keys. The kernel's
    head sizes: 16 (8-lane dot products), 64 (values kept in registers), 12 (the scalar tails)."""
    D = head_dim
    if kernel and decode_attention.load() is None:
        pytest.skip(f"C kernel unavailable: {native.unavailable_reason()}")
    rng = random.Random(0)
    g = torch.Generator().manual_seed(0)
    cache = PagedKVCache(_config(D), num_blocks=2000, block_size=BS, dtype=torch.float32, decode_kernel=kernel)
    free = list(range(1, 2000))
    rng.shuffle(free)
    # (context_len, num_new_tokens): decodes, one fresh prompt, one prompt continued after 10 cached tokens
    shapes = [(rng.randint(1, 90), 1) for _ in range(40)] + [(300, 1), (1100, 1), (13, 13), (25, 15)]
    chunks, history, offset = [], [], 0
    for context_len, n in shapes:
        blocks = [free.pop() for _ in range(-(-context_len // BS))]
        k_all, v_all = torch.randn(context_len, HKV, D, generator=g), torch.randn(context_len, HKV, D, generator=g)
        cached = context_len - n  # earlier positions are already in the cache
        for pos in range(cached):
            cache.k[0][blocks[pos // BS], pos % BS] = k_all[pos]
            cache.v[0][blocks[pos // BS], pos % BS] = v_all[pos]
        chunks.append(StepChunk(offset, n, context_len, blocks))
        history.append((k_all, v_all))
        offset += n
    q = torch.randn(offset, HQ, 2 * D, generator=g)[..., :D]  # a strided view, as a projection's split gives
    k_new = torch.cat([k[c.context_len - c.num_tokens:] for c, (k, _) in zip(chunks, history)])
    v_new = torch.cat([v[c.context_len - c.num_tokens:] for c, (_, v) in zip(chunks, history)])

    attn = PagedAttention(cache, chunks)
    if kernel:
        assert len(attn.decode_batches) == 1 and not attn.decode_buckets
    else:
        assert len(attn.decode_buckets) == 2  # 40 decodes: buckets of at least 16
    out = attn.attend(0, q, k_new, v_new, scale=D**-0.5)
    for c, (k_all, v_all) in zip(chunks, history):
        rows = slice(c.offset, c.offset + c.num_tokens)
        want = causal_attention(q[rows], k_all, v_all, D**-0.5)
        torch.testing.assert_close(out[rows], want, rtol=1e-5, atol=1e-5)


def test_buckets_are_length_sorted_runs_of_similar_size():
    chunks = [StepChunk(i, 1, length, []) for i, length in enumerate(range(100, 0, -1))]
    parts = _split(sorted(chunks, key=lambda c: c.context_len))
    assert len(parts) == MAX_DECODE_BUCKETS
    assert sum(len(p) for p in parts) == 100 and max(map(len, parts)) - min(map(len, parts)) <= 1
    assert all(a[-1].context_len <= b[0].context_len for a, b in zip(parts, parts[1:]))
    assert len(_split(chunks[:10])) == 1 and _split([]) == []


@pytest.mark.parametrize("kernel", [False, True], ids=["torch-buckets", "c-kernel"])
def test_attention_workers_give_bitwise_the_same_step(kernel):
    """The same mixed step (two decode buckets or kernel shares, a fresh and a continued prompt)
    shared among 2 or 3 threads: every row is bit-identical to the one-thread result, and helpers
    did run calls."""
    import threading

    if kernel and decode_attention.load() is None:
        pytest.skip(f"C kernel unavailable: {native.unavailable_reason()}")

    from glm_ray.engine.attention_workers import AttentionWorkers

    rng = random.Random(1)
    g = torch.Generator().manual_seed(1)
    cache = PagedKVCache(_config(), num_blocks=2000, block_size=BS, dtype=torch.float32, decode_kernel=kernel)
    for t in cache.k + cache.v:
        t.normal_(generator=g)
    free = list(range(1, 2000))
    rng.shuffle(free)
    chunks, offset = [], 0
    for context_len, n in [(rng.randint(1, 90), 1) for _ in range(40)] + [(13, 13), (25, 15), (60, 7)]:
        chunks.append(StepChunk(offset, n, context_len, [free.pop() for _ in range(-(-context_len // BS))]))
        offset += n
    q, k, v = (torch.randn(offset, h, D, generator=g) for h in (HQ, HKV, HKV))
    want = PagedAttention(cache, chunks).attend(0, q, k, v, scale=D**-0.5)
    for n in (2, 3):
        workers = AttentionWorkers(n)
        try:
            got = PagedAttention(cache, chunks, workers).attend(0, q, k, v, scale=D**-0.5)
            assert any(t.name.startswith("glm-ray-attention") for t in threading.enumerate())
        finally:
            workers.close()
        assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("threads", [1, 2])
def test_prefill_attention_has_the_bits_of_torchs_sdpa(dtype, threads):
    """Prefill attention skips the passes torch's math path makes for rows that see no key, and must
    keep its arithmetic bit for bit: greedy outputs are held to transformers' token for token, and
    another summation order measurably flips near ties. Whole and continued prompts (1..700 keys),
    GQA and not, inputs as the model makes them (views of the qkv projection)."""
    import torch.nn.functional as F

    rng = random.Random(threads)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for hq, hkv, d in ((8, 2, 64), (4, 4, 32)):
            for _ in range(12):
                tk = rng.randrange(1, 700)
                tq = rng.choice([tk, rng.randrange(1, tk + 1)])
                qkv = torch.randn(tk, (hq + 2 * hkv) * d, dtype=dtype)
                q, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
                q, k, v = q[tk - tq:].reshape(tq, hq, d), k.reshape(tk, hkv, d), v.reshape(tk, hkv, d)
                sees = torch.arange(tk)[None, :] <= torch.arange(tq)[:, None] + (tk - tq)
                want = F.scaled_dot_product_attention(
                    q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=sees if tq > 1 else None,
                    scale=d**-0.5, enable_gqa=hq != hkv).transpose(0, 1)
                got = causal_attention(q, k, v, d**-0.5)
                assert got.dtype == dtype and torch.equal(got, want), (hq, hkv, d, tq, tk)
    finally:
        torch.set_num_threads(before)
