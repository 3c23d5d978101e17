"""The batched expert path and the router, each held equal to a plain one-token-at-a-time definition."""

import pytest
import torch

from glm_ray.experts.local import ExpertWeights, LocalExperts, reference_moe
from glm_ray.model.moe import route

T, H, I, E, K = 37, 16, 8, 6, 3


def random_experts(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    w13 = torch.randn(E, 2 * I, H, generator=g).to(dtype)
    w2 = torch.randn(E, H, I, generator=g).to(dtype)
    return w13, w2


def random_routing(seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    weights = torch.rand(T, K, generator=g)
    return x, ids, weights


def test_batched_experts_equal_the_per_pair_definition():
    w13, w2 = random_experts()
    x, ids, weights = random_routing()
    backend = LocalExperts({3: ExpertWeights(range(E), w13, w2, E)})
    want = reference_moe(x, ids, weights, {e: (w13[e], w2[e]) for e in range(E)})
    got = backend.forward(3, x, ids, weights)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_grouped_mm_path_equals_the_looped_path():
    import glm_ray.experts.local as local

    w13, w2 = random_experts()
    x = torch.randn(50, H, generator=torch.Generator().manual_seed(3))  # seeded: the tolerance is tight
    counts = torch.tensor([7, 0, 20, 3, 0, 20])
    if not local._HAS_GROUPED_MM:
        pytest.skip("this torch has no grouped_mm")
    torch.testing.assert_close(local._grouped_mm_experts(x, counts, w13, w2),
                               local._looped_experts(x, counts, w13, w2), rtol=1e-5, atol=1e-5)


def test_padded_path_equals_the_looped_path():
    import glm_ray.experts.local as local

    w13, w2 = random_experts()
    x = torch.randn(50, H, generator=torch.Generator().manual_seed(3))  # seeded: the tolerance is tight
    counts = torch.tensor([7, 0, 20, 3, 0, 20])  # an idle expert and uneven counts: padding must not leak
    torch.testing.assert_close(local._padded_experts(x, counts, w13, w2),
                               local._looped_experts(x, counts, w13, w2), rtol=1e-5, atol=1e-5)


def test_path_choice_follows_the_rows_per_expert():
    import glm_ray.experts.local as local

    if not local._HAS_GROUPED_MM:
        pytest.skip("this torch has no grouped_mm")
    decode = torch.full((32,), 8)  # every expert busy, few rows each
    assert local._experts_path(decode) is local._padded_experts
    assert local._experts_path(torch.full((32,), 300)) is local._grouped_mm_experts  # prefill
    mostly_idle = torch.zeros(32, dtype=torch.long)
    mostly_idle[:4] = 8
    assert local._experts_path(mostly_idle) is local._grouped_mm_experts


def test_expert_subsets_sum_to_the_whole():
    """Two holders of disjoint expert subsets (as two expert groups would be) add up to all experts."""
    w13, w2 = random_experts()
    x, ids, weights = random_routing()
    whole = LocalExperts({1: ExpertWeights(range(E), w13, w2, E)}).partial_forward(1, x, ids, weights)
    a_ids, b_ids = [0, 1, 2, 3], [4, 5]
    a = LocalExperts({1: ExpertWeights(a_ids, w13[a_ids], w2[a_ids], E)}).partial_forward(1, x, ids, weights)
    b = LocalExperts({1: ExpertWeights(b_ids, w13[b_ids], w2[b_ids], E)}).partial_forward(1, x, ids, weights)
    assert a.abs().sum() > 0 and b.abs().sum() > 0
    torch.testing.assert_close(a + b, whole, rtol=1e-5, atol=1e-5)


def test_tokens_routed_nowhere_here_get_zero():
    w13, w2 = random_experts()
    x, _, weights = random_routing()
    ids = torch.full((T, K), 5)
    held = LocalExperts({0: ExpertWeights([0, 1], w13[:2], w2[:2], E)})
    assert torch.count_nonzero(held.partial_forward(0, x, ids, weights)) == 0


def naive_route(logits, bias, k, n_group, topk_group, norm, rsf):
    """glm-spec §3.4, one token at a time with Python lists."""
    ids_out, w_out = [], []
    e = logits.shape[1]
    per = e // n_group
    for row in range(logits.shape[0]):
        s = [1 / (1 + torch.exp(-logits[row, j]).item()) for j in range(e)]
        sel = [s[j] + bias[j].item() for j in range(e)]
        groups = [sum(sorted(sel[g * per:(g + 1) * per], reverse=True)[:2]) for g in range(n_group)]
        kept = sorted(range(n_group), key=lambda g: -groups[g])[:topk_group]
        cand = [j for j in range(e) if j // per in kept]
        chosen = sorted(cand, key=lambda j: -sel[j])[:k]
        w = [s[j] for j in chosen]
        if norm:
            total = sum(w) + 1e-20
            w = [x / total for x in w]
        ids_out.append(chosen)
        w_out.append([x * rsf for x in w])
    return ids_out, w_out


@pytest.mark.parametrize("n_group, topk_group, k, norm, rsf", [
    (1, 1, 4, True, 2.5), (4, 2, 3, True, 1.0), (2, 1, 1, False, 1.0), (8, 3, 5, False, 2.5),
])
def test_router_matches_the_spec(n_group, topk_group, k, norm, rsf):
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(20, 16, generator=g)
    bias = 0.3 * torch.randn(16, generator=g)
    ids, weights = route(logits, bias, top_k=k, n_group=n_group, topk_group=topk_group,
                         norm_topk_prob=norm, routed_scaling_factor=rsf)
    want_ids, want_w = naive_route(logits, bias, k, n_group, topk_group, norm, rsf)
    for row in range(20):
        order = torch.argsort(ids[row])
        assert ids[row][order].tolist() == sorted(want_ids[row])
        by_id = dict(zip(want_ids[row], want_w[row]))
        assert weights[row][order].tolist() == pytest.approx([by_id[i] for i in sorted(by_id)], rel=1e-5)


def test_bias_chooses_but_does_not_weight():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    bias = torch.tensor([0.0, 0.0, 0.0, 5.0])  # pushes expert 3 into the top-1
    ids, weights = route(logits, bias, top_k=1, n_group=1, topk_group=1, norm_topk_prob=False,
                         routed_scaling_factor=1.0)
    assert ids.tolist() == [[3]]
    assert weights.item() == pytest.approx(torch.sigmoid(torch.tensor(-1.0)).item())


# The C kernel (glm_ray/experts/swiglu_kernel.c). On a machine where it can be built it must be;
# elsewhere (no compiler, no AVX2) the torch paths run and these tests skip.
from glm_ray.experts import local, swiglu_kernel  # noqa: E402

needs_kernel = pytest.mark.skipif(swiglu_kernel.unavailable_reason() is not None,
                                  reason=f"C kernel unavailable: {swiglu_kernel.unavailable_reason()}")


@needs_kernel
def test_kernel_builds_and_loads_where_it_can():
    assert swiglu_kernel.load() is not None


def _kernel_rows(x, counts, w13, w2):
    """The kernel's SwiGLU of each row of x (rows sorted by expert, `counts` an expert), through
    `moe` with one pair a token at weight 1 and no row limit."""
    ids = torch.repeat_interleave(torch.arange(counts.numel()), counts)[:, None]
    return swiglu_kernel.moe(x, ids, torch.ones(x.shape[0], 1), w13, w2, max_rows=1 << 40)


@needs_kernel
@pytest.mark.parametrize("hidden, inter", [(16, 8), (20, 12), (512, 256)])  # 20, 12: widths not a multiple of 8
def test_kernel_equals_the_looped_path(hidden, inter):
    import glm_ray.experts.local as local

    g = torch.Generator().manual_seed(hidden)
    w13 = torch.randn(7, 2 * inter, hidden, generator=g) / hidden ** 0.5
    w2 = torch.randn(7, hidden, inter, generator=g) / inter ** 0.5
    # idle experts, 1..3 rows (partial register tiles), and more rows than one work item (64)
    counts = torch.tensor([5, 0, 1, 70, 3, 0, 130])
    x = torch.randn(int(counts.sum()), hidden, generator=g)
    torch.testing.assert_close(_kernel_rows(x, counts, w13, w2), local._looped_experts(x, counts, w13, w2),
                               rtol=1e-5, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize("tokens", [0, 1, 7, 64])
def test_whole_layer_kernel_equals_the_definition(tokens):
    """`moe`: routing sort, gather, SwiGLU, weights and each token's sum in one call, with pairs
    routed elsewhere (-1) adding nothing and a token with no pair here coming out zero."""
    g = torch.Generator().manual_seed(tokens)
    w13, w2 = random_experts()
    e = w13.shape[0]
    x = torch.randn(tokens, H, generator=g)
    ids = torch.randint(-1, e, (tokens, 4), generator=g)
    if tokens:
        ids[0] = -1  # routed nowhere here
    weights = torch.rand(tokens, 4, generator=g)
    got = swiglu_kernel.moe(x, ids, weights, w13, w2, max_rows=96)
    want = local.reference_moe(x, ids, weights, {i: (w13[i], w2[i]) for i in range(e)})
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    if tokens:
        assert torch.equal(got[0], torch.zeros(H))
    # the layer as the engine runs it takes this path, and its result
    torch.testing.assert_close(local.grouped_swiglu(x, ids, weights, w13, w2), got, rtol=0, atol=0)


@needs_kernel
def test_whole_layer_kernel_gives_the_same_bits_on_any_thread_count():
    """`threads` only changes who computes an (expert, rows) item, never its arithmetic: a replica
    may run the kernel on more threads than torch's (serving/attention.py)."""
    g = torch.Generator().manual_seed(5)
    w13, w2 = random_experts()
    x = torch.randn(64, H, generator=g)
    ids = torch.randint(-1, w13.shape[0], (64, 4), generator=g)
    weights = torch.rand(64, 4, generator=g)
    want = swiglu_kernel.moe(x, ids, weights, w13, w2, max_rows=96, threads=1)
    for threads in (2, 3):
        assert torch.equal(swiglu_kernel.moe(x, ids, weights, w13, w2, max_rows=96, threads=threads), want)
        assert torch.equal(local.grouped_swiglu(x, ids, weights, w13, w2, kernel_threads=threads), want)


@needs_kernel
def test_whole_layer_kernel_declines_prefill_sizes():
    w13, w2 = random_experts()
    x, ids = torch.randn(40, H), torch.zeros(40, 4, dtype=torch.long)  # 160 rows on expert 0
    assert swiglu_kernel.moe(x, ids, torch.rand(40, 4), w13, w2, max_rows=96) is None
    want = local.reference_moe(x, ids, torch.ones(40, 4), {i: (w13[i], w2[i]) for i in range(w13.shape[0])})
    torch.testing.assert_close(local.grouped_swiglu(x, ids, torch.ones(40, 4), w13, w2), want, rtol=1e-4, atol=1e-4)


@needs_kernel
@pytest.mark.parametrize("hidden, inter", [(16, 8), (20, 12), (512, 256)])  # 20, 12: tails after the 8-wide steps
def test_bf16_held_weights_give_the_bits_of_the_same_weights_upcast(hidden, inter):
    """A bf16 checkpoint computed in fp32 may keep its experts in bf16 (model/loader.py: compact):
    the kernel widens each weight as it reads it, exactly, so every path of a layer gives the bits
    of the same weights upcast at load: the kernel on 1-3 threads (idle experts, partial tiles,
    skipped pairs), and large prefills, where torch's matmuls get a widened copy."""
    g = torch.Generator().manual_seed(hidden + inter)
    w13 = (torch.randn(6, 2 * inter, hidden, generator=g) / hidden ** 0.5).bfloat16()
    w2 = (torch.randn(6, hidden, inter, generator=g) / inter ** 0.5).bfloat16()
    w13f, w2f = w13.float(), w2.float()
    assert swiglu_kernel.usable(torch.zeros(1, hidden), w13, w2)
    for tokens in (1, 7, 64):  # decode sizes: the kernel
        x = torch.randn(tokens, hidden, generator=g)
        ids = torch.randint(-1, 5, (tokens, 4), generator=g)  # expert 5 idle, some pairs elsewhere
        weights = torch.rand(tokens, 4, generator=g)
        want = swiglu_kernel.moe(x, ids, weights, w13f, w2f, max_rows=96)
        for threads in (1, 2, 3):
            got = swiglu_kernel.moe(x, ids, weights, w13, w2, max_rows=96, threads=threads)
            assert torch.equal(got.view(torch.int32), want.view(torch.int32))
        assert torch.equal(local.grouped_swiglu(x, ids, weights, w13, w2), want)
    x = torch.randn(200, hidden, generator=g)  # 200 x 4 pairs on 5 experts: beyond the kernel's rows
    ids = torch.randint(0, 5, (200, 4), generator=g)
    weights = torch.rand(200, 4, generator=g)
    assert swiglu_kernel.moe(x, ids, weights, w13, w2, max_rows=96) is None
    want = local.grouped_swiglu(x, ids, weights, w13f, w2f)
    assert torch.equal(local.grouped_swiglu(x, ids, weights, w13, w2), want)
    assert torch.equal(w13.float(), w13f)  # the widened copy was a copy: the weights are as they were
    with pytest.raises(ValueError, match="must both be float32 or both bfloat16"):
        swiglu_kernel.moe(x[:4], ids[:4], weights[:4], w13, w2f, max_rows=96)


@needs_kernel
def test_large_prefills_widen_only_the_experts_with_rows_a_chunk_at_a_time(monkeypatch):
    """Beyond the kernel's rows, bf16-held experts reach torch's matmuls widened, a bounded chunk at a
    time (two experts here) and only those with rows (2 and 5 idle): the bits of the fp32 path."""
    g = torch.Generator().manual_seed(9)
    w13 = (torch.randn(7, 2 * I, H, generator=g) / H ** 0.5).bfloat16()
    w2 = (torch.randn(7, H, I, generator=g) / I ** 0.5).bfloat16()
    x = torch.randn(250, H, generator=g)  # 250 x 3 pairs on 5 experts: beyond the kernel's 96 rows
    ids = torch.tensor([0, 1, 3, 4, 6])[torch.randint(0, 5, (250, 3), generator=g)]
    ids[::7, 1] = -1  # some pairs computed elsewhere
    weights = torch.rand(250, 3, generator=g)
    want = local.grouped_swiglu(x, ids, weights, w13.float(), w2.float())
    widened = []
    real = local._widen_buffers
    monkeypatch.setattr(local, "_widen_buffers", lambda n, *a: widened.append(n) or real(n, *a))
    monkeypatch.setattr(local, "WIDEN_BYTES", 2 * 3 * H * I * 4)  # two experts' fp32 weights
    monkeypatch.setattr(local._scratch, "flat", None, raising=False)  # this thread's buffer made anew here
    assert torch.equal(local.grouped_swiglu(x, ids, weights, w13, w2), want)
    assert widened == [2, 2, 1]  # experts 0 1 | 3 4 | 6
    with torch.inference_mode():  # the buffer, made outside inference mode, serves inside it, and back
        assert torch.equal(local.grouped_swiglu(x, ids, weights, w13, w2), want)
    monkeypatch.setattr(local, "WIDEN_BYTES", 4 * 3 * H * I * 4)
    with torch.inference_mode():  # grown inside inference mode, it serves outside
        assert torch.equal(local.grouped_swiglu(x, ids, weights, w13, w2), want)
    assert torch.equal(local.grouped_swiglu(x, ids, weights, w13, w2), want)


def _torch_combine(y, order, t, k, weights):
    """The torch ops the C combine replaces."""
    pairs = torch.zeros(t * k, y.shape[1])
    pairs[order] = y * weights.reshape(-1)[order, None]
    return pairs.view(t, k, y.shape[1]).sum(dim=1)


def _kept_order(ids):
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    return order[int((flat < 0).sum()):]


@needs_kernel
@pytest.mark.parametrize("k, hidden", [(4, 512), (4, 20), (8, 512)])  # 20: not a multiple of 8
def test_prefill_combine_has_the_bits_of_the_torch_ops_it_replaces(k, hidden):
    """After torch's matmuls (experts with more rows than the kernel takes), the scaling, un-sorting
    and sum over k run in one C pass: bit for bit what scattering the scaled rows into zeroed pairs
    and summing over k give (each product rounded, then added in k order; a sum of negative zeros is
    +0, as torch's), skipped pairs adding nothing, on any thread count."""
    assert swiglu_kernel.combine_matches_torch(k, hidden)
    g = torch.Generator().manual_seed(7)
    t = 300
    ids = torch.randint(-1, 6, (t, k), generator=g)  # about 1 pair in 7 skipped (-1)
    ids[0] = -1  # a token with no pair here
    order = _kept_order(ids)
    y = torch.randn(order.numel(), hidden, generator=g) * 4
    weights = torch.rand(t, k, generator=g) * 2.5
    weights[1] = 0.0  # token 1: every product is +-0
    want = _torch_combine(y, order, t, k, weights)
    for threads in (1, 2, 3):
        got = swiglu_kernel.combine(y, order, t, k, weights, threads=threads)
        assert torch.equal(got.view(torch.int32), want.view(torch.int32))  # the bits, signs of zeros too
        assert not got[0].any() and not got[1].any()


@needs_kernel
def test_prefill_combine_refuses_an_order_that_is_not_pair_indices():
    y, weights = torch.randn(3, 8), torch.rand(2, 2)
    with pytest.raises(ValueError, match="outside 0..3"):
        swiglu_kernel.combine(y, torch.tensor([0, 1, 4]), 2, 2, weights)


def test_torch_sums_over_k_in_order_wherever_combine_stands_in_for_it():
    """combine_matches_torch names where torch's sum over k adds in k order, which is what the C
    combine does: hold this torch to it on the shapes it admits, GLM's (k 8, H 4096) among them.
    (Elsewhere, e.g. k 8 and H 20, this torch interleaves the terms, and the torch ops stay.)"""
    g = torch.Generator().manual_seed(9)
    for k, hidden in [(1, 20), (2, 20), (4, 20), (4, 512), (6, 512), (8, 4096), (16, 64)]:
        assert swiglu_kernel.combine_matches_torch(k, hidden), (k, hidden)
        for t in (1, 33, 300):
            x = torch.randn(t, k, hidden, generator=g)
            in_order = x[:, 0].clone()
            for j in range(1, k):
                in_order = in_order + x[:, j]
            assert torch.equal(x.sum(dim=1), in_order), (k, hidden, t)
    assert not swiglu_kernel.combine_matches_torch(8, 20)


@needs_kernel
@pytest.mark.parametrize("k, hidden", [(3, 16), (8, 64), (8, 20)])  # (8, 20): the torch ops, not the C combine
def test_prefill_sizes_give_the_torch_paths_bits(k, hidden):
    """A layer past the kernel's rows per expert: grouped_swiglu (torch's matmuls, then the C
    combine where it matches torch) equals the all-torch path bit for bit."""
    g = torch.Generator().manual_seed(8)
    w13, w2 = torch.randn(E, 2 * I, hidden, generator=g), torch.randn(E, hidden, I, generator=g)
    t = 400  # 400 * k / 6 rows an expert, past KERNEL_MAX_ROWS
    x = torch.randn(t, hidden, generator=g)
    ids = torch.randint(-1, E, (t, k), generator=g)
    weights = torch.rand(t, k, generator=g)
    assert swiglu_kernel.moe(x, ids, weights, w13, w2, max_rows=local.KERNEL_MAX_ROWS) is None
    order = _kept_order(ids)
    counts = torch.bincount(ids.reshape(-1)[order], minlength=E)
    y = local._experts_path(counts)(x[order // k], counts, w13, w2)
    want = _torch_combine(y, order, t, k, weights)
    assert torch.equal(local.grouped_swiglu(x, ids, weights, w13, w2).view(torch.int32), want.view(torch.int32))


@needs_kernel
def test_kernel_silu_holds_at_extreme_gate_values():
    """Gates from -1e4 to 1e4 (exp over- and underflow ranges) give what torch's silu gives."""
    import glm_ray.experts.local as local

    hidden, inter = 8, 64
    w13 = torch.zeros(1, 2 * inter, hidden)
    w13[0, :inter, 0] = torch.cat([torch.linspace(-1e4, 1e4, inter - 4), torch.tensor([0.0, -87.5, 88.5, -88.5])])
    w13[0, inter:, 1] = 1.0  # up = x[1]
    w2 = torch.randn(1, hidden, inter, generator=torch.Generator().manual_seed(0))
    x = torch.tensor([[1.0, 2.0] + [0.0] * (hidden - 2), [-0.5, 1.0] + [0.0] * (hidden - 2)])
    counts = torch.tensor([2])
    got = _kernel_rows(x, counts, w13, w2)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, local._looped_experts(x, counts, w13, w2), rtol=1e-5, atol=1e-3)


@needs_kernel
def test_decode_sizes_take_the_kernel_when_usable():
    import glm_ray.experts.local as local

    w13, w2 = random_experts()
    decode, prefill = torch.arange(E * 8) % E, torch.zeros(300, dtype=torch.long)  # 8 rows an expert; 300 on one
    for ids, takes in ((decode, True), (prefill, False)):
        out = swiglu_kernel.moe(torch.randn(len(ids), H), ids[:, None], torch.ones(len(ids), 1), w13, w2,
                                max_rows=local.KERNEL_MAX_ROWS)
        assert (out is not None) is takes
    assert swiglu_kernel.usable(torch.randn(3, H), w13, w2)
    assert not swiglu_kernel.usable(torch.randn(3, H).bfloat16(), *random_experts(dtype=torch.bfloat16))
    assert not swiglu_kernel.usable(torch.randn(3, H), w13.transpose(1, 2).contiguous().transpose(1, 2), w2)


@needs_kernel
def test_kernel_runs_on_torchs_openmp_runtime():
    """One libgomp in the process: the kernel's threads are torch's, not a second spinning pool."""
    swiglu_kernel.load()
    with open("/proc/self/maps") as maps:
        gomp = {line.split()[-1] for line in maps if "libgomp" in line}
    assert len(gomp) == 1, gomp


@needs_kernel
def test_kernel_build_is_cached_per_source(tmp_path, monkeypatch):
    monkeypatch.setenv("GLM_RAY_CACHE", str(tmp_path))
    first = swiglu_kernel.build()
    assert first.parent == tmp_path / "kernels" and first.exists()
    stamp = first.stat().st_mtime_ns
    assert swiglu_kernel.build() == first and first.stat().st_mtime_ns == stamp  # not rebuilt
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # no temporaries left behind


def test_kernel_can_be_switched_off(monkeypatch):
    monkeypatch.setenv("GLM_RAY_CPU_KERNEL", "0")
    assert swiglu_kernel.unavailable_reason() == "GLM_RAY_CPU_KERNEL=0"
