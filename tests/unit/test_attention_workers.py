"""AttentionWorkers: balanced shares, every call run once, helpers used, errors raised."""

import threading

import pytest
import torch

from glm_ray.engine.attention_workers import AttentionWorkers, balance


def test_balance_puts_costliest_first_on_the_least_loaded_share():
    assert balance([5, 1, 4, 2, 3], 2) == [[0, 3, 1], [2, 4]]  # 5+2+1 = 8 against 4+3 = 7
    assert balance([1, 1, 1], 3) == [[0], [1], [2]]
    assert balance([7], 3) == [[0], [], []] and balance([], 2) == [[], []]


def test_every_call_runs_once_and_helpers_take_a_share():
    workers = AttentionWorkers(3)
    try:
        seen = []

        def call(i):
            seen.append((i, threading.current_thread().name, torch.is_inference_mode_enabled()))
            return i * i

        results = workers.run([(float(c), lambda i=i: call(i)) for i, c in enumerate([9, 1, 5, 5, 2, 8])])
        assert sorted(results) == [i * i for i in range(6)]
        assert sorted(i for i, _, _ in seen) == list(range(6))
        helpers = {name for _, name, _ in seen if name.startswith("glm-ray-attention")}
        assert len(helpers) >= 1 and any(name == threading.current_thread().name for _, name, _ in seen)
        assert all(mode for _, name, mode in seen if name in helpers)  # helpers run in inference mode
    finally:
        workers.close()


def test_an_error_in_a_helper_reaches_the_caller():
    workers = AttentionWorkers(2)
    try:
        where = []

        def boom():
            where.append(threading.current_thread().name)
            raise RuntimeError("bad bucket")
        with pytest.raises(RuntimeError, match="bad bucket"):
            workers.run([(5.0, lambda: 1), (1.0, boom)])  # the costlier call is the caller's, boom a helper's
        assert where[0].startswith("glm-ray-attention")
    finally:
        workers.close()


def test_one_thread_is_not_workers():
    with pytest.raises(ValueError, match="n >= 2"):
        AttentionWorkers(1)


def test_linear_rows_split_among_threads_are_bit_identical():
    """Projections of the attention side's shapes, with and without bias, any row count: the
    rows computed on 2 or 3 threads equal the one-thread product bit for bit; small ones and
    non-2D inputs are left whole."""
    g = torch.Generator().manual_seed(0)
    for n in (2, 3):
        workers = AttentionWorkers(n)
        try:
            for k, out_features, with_bias in [(512, 768, True), (512, 512, False), (256, 512, False), (64, 96, True)]:
                weight = torch.randn(out_features, k, generator=g)
                bias = torch.randn(out_features, generator=g) if with_bias else None
                for m in (1, 63, 64, 65, 130, 257, 1031):
                    x = torch.randn(m, k, generator=g)
                    assert torch.equal(workers.linear(x, weight, bias), torch.nn.functional.linear(x, weight, bias))
            x3 = torch.randn(2, 70, 64, generator=g)
            assert torch.equal(workers.linear(x3, weight, bias), torch.nn.functional.linear(x3, weight, bias))
        finally:
            workers.close()


def test_share_projections_leaves_the_shared_experts_on_the_engine_thread(tiny_model_dir):
    """Attention and dense-MLP projections get the workers; shared experts (computed while the
    routed experts are remote) do not."""
    from glm_ray.engine.attention_workers import share_projections
    from glm_ray.model.layers import Linear
    from glm_ray.model.loader import load_model

    model, _, _ = load_model(tiny_model_dir, dtype=torch.float32, with_experts=False)
    workers = AttentionWorkers(2)
    try:
        count = share_projections(model, workers)
        linears = {name: m for name, m in model.named_modules() if isinstance(m, Linear)}
        assert count == sum(".shared_experts." not in name for name in linears) > 0
        for name, m in linears.items():
            assert (m.workers is None) == (".shared_experts." in name), name
        assert any(".shared_experts." in name for name in linears)
    finally:
        workers.close()
