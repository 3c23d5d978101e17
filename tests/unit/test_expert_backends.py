"""Expert compute backends (experts/compute.py, experts/deepspeed_moe.py) and the device option:
every backend held equal to the per-pair definition, the choice and its fallbacks, and what
DeepSpeed is handed, checked by emulating its kernels' documented semantics in torch."""

import logging

import pytest
import torch
import torch.nn.functional as F

from glm_ray.device import check_device, resolve_device
from glm_ray.engine.config import EngineOptions
from glm_ray.experts.compute import ExpertCompute, select_compute, torch_grouped_swiglu
from glm_ray.experts.deepspeed_moe import (
    DeepSpeedKernels, DeepSpeedUnavailable, load_deepspeed, ragged_offsets, to_deepspeed_layout,
)
from glm_ray.experts.local import ExpertWeights, LocalExperts, reference_moe
from glm_ray.experts.staging import HostStaging

T, H, I, E, K = 29, 16, 8, 6, 4
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks what happens without CUDA")


def experts(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return ExpertWeights(range(E), (torch.randn(E, 2 * I, H, generator=g) / 3).to(dtype),
                         (torch.randn(E, H, I, generator=g) / 3).to(dtype), E)


def routing(seed=1, skip=0.0, t=T):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, H, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(t)]) if t else torch.empty(0, K).long()
    ids = ids.masked_fill(torch.rand(ids.shape, generator=g) < skip, -1)  # -1: the pair's expert is elsewhere
    return x, ids, torch.rand(t, K, generator=g)


def definition(held, x, ids, weights):
    return reference_moe(x.float(), ids, weights, {e: (held.w13[e].float(), held.w2[e].float()) for e in range(E)})


@pytest.mark.parametrize("skip", [0.0, 0.5, 1.0])
def test_torch_backend_equals_the_definition_in_fp32(skip):
    held = experts()
    x, ids, weights = routing(skip=skip)
    torch.testing.assert_close(torch_grouped_swiglu(x, ids, weights, held), definition(held, x, ids, weights),
                               rtol=1e-5, atol=1e-5)


def test_torch_backend_in_bf16_is_within_bf16_rounding():
    # bf16 keeps 8 bits of mantissa (relative step 2^-8 = 0.4%); two GEMMs and the activation
    # round a few times, so 3% of the output scale bounds it with room and still catches a wrong
    # expert, weight or row (those are off by the whole output scale)
    held = experts(torch.bfloat16)
    x, ids, weights = routing(skip=0.3)
    want = definition(held, x.bfloat16(), ids, weights)
    got = torch_grouped_swiglu(x.bfloat16(), ids, weights, held)
    assert got.dtype == torch.float32
    assert float((got - want).abs().max()) <= 0.03 * float(want.abs().max())


def test_torch_backend_takes_empty_batches_and_idle_experts():
    held = experts()
    x, ids, weights = routing(t=0)
    assert torch_grouped_swiglu(x, ids, weights, held).shape == (0, H)
    x, ids, weights = routing()
    ids = ids.clamp(max=1)  # experts 2..5 idle
    torch.testing.assert_close(torch_grouped_swiglu(x, ids, weights, held), definition(held, x, ids, weights),
                               rtol=1e-5, atol=1e-5)


def test_every_backend_choice_gives_the_same_engine_tokens(tiny_model_dir):
    from glm_ray import LLM, SamplingParams

    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=2)
    prompts = ["The capital of France", "1 2 3 4", "GLM routes each token to"]
    runs = {b: LLM(tiny_model_dir, dtype="float32", device="cpu", expert_backend=b).generate(prompts, params)
            for b in ("cpu-kernel", "torch")}
    for a, b in zip(runs["cpu-kernel"], runs["torch"]):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for la, lb in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            for tok, lp in la.items():
                assert abs(lp.logprob - lb[tok].logprob) < 1e-4


def test_auto_on_cpu_is_the_cpu_kernel_and_explicit_misfits_name_why():
    assert select_compute("auto", torch.device("cpu")).name == "cpu-kernel"
    assert select_compute("torch", torch.device("cpu")).name == "torch"
    with pytest.raises(ValueError, match="cpu-kernel runs on CPU only.*cuda"):
        select_compute("cpu-kernel", torch.device("cuda"))
    with pytest.raises(ValueError, match="deepspeed needs CUDA"):
        select_compute("deepspeed", torch.device("cpu"))
    with pytest.raises(ValueError, match="expert_backend must be one of auto, cpu-kernel, torch, deepspeed"):
        select_compute("fast", torch.device("cpu"))


def test_auto_on_cuda_falls_back_to_torch_saying_which_kernel_and_why(caplog):
    def broken(device):
        raise DeepSpeedUnavailable("cutlass_ops MoEGEMM cannot be loaded: RuntimeError: Arch unsupported")

    with caplog.at_level(logging.WARNING, logger="glm_ray.experts.compute"):
        chosen = select_compute("auto", torch.device("cuda"), load_deepspeed=broken)
    assert chosen.name == "torch" and "cutlass_ops MoEGEMM" in chosen.note
    assert "cutlass_ops MoEGEMM cannot be loaded" in caplog.text and "using the torch backend" in caplog.text
    with pytest.raises(ValueError, match="expert_backend deepspeed: cutlass_ops MoEGEMM cannot be loaded"):
        select_compute("deepspeed", torch.device("cuda"), load_deepspeed=broken)
    fine = ExpertCompute("deepspeed", torch_grouped_swiglu)
    assert select_compute("auto", torch.device("cuda"), load_deepspeed=lambda d: fine) is fine


def test_deepspeed_reports_what_is_missing_here():
    with pytest.raises(DeepSpeedUnavailable, match="need CUDA"):
        load_deepspeed(torch.device("cpu"))
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        with pytest.raises(DeepSpeedUnavailable, match="deepspeed is not installed.*glm-ray\\[deepspeed\\]"):
            DeepSpeedKernels(torch.bfloat16, H, I)


def test_deepspeed_layout_computes_glms_gated_swiglu():
    """DeepSpeed's first GEMM is x @ w1[e] ([H, 2I]), its SiGLU takes silu(even columns) * odd
    columns, its second GEMM is @ w2[e] ([I, H]): on our layout that must be GLM's expert."""
    held = experts()
    w1, w2 = to_deepspeed_layout(held.w13, held.w2)
    assert w1.shape == (E, H, 2 * I) and w2.shape == (E, I, H) and w1.is_contiguous() and w2.is_contiguous()
    x = torch.randn(5, H)
    for e in range(E):
        gated = x @ w1[e]
        ds = (F.silu(gated[:, 0::2]) * gated[:, 1::2]) @ w2[e]
        gate, up = (x @ held.w13[e].T).chunk(2, dim=-1)
        torch.testing.assert_close(ds, (F.silu(gate) * up) @ held.w2[e].T, rtol=1e-5, atol=1e-5)


def test_ragged_tensors_are_what_deepspeeds_scatter_and_gather_expect():
    """Emulate moe_scatter (row = exclusive cumsum[e] + offset) and moe_gather (sum of score *
    row) on the counts and offsets we hand them: the result must be the definition."""
    held = experts()
    x, ids, weights = routing()
    counts, offsets = ragged_offsets(ids, E)
    assert counts.dtype == offsets.dtype == torch.int32 and offsets.shape == ids.shape
    for e in range(E):  # each expert's offsets are exactly 0..count-1
        assert sorted(offsets[ids == e].tolist()) == list(range(int(counts[e])))
    starts = torch.cumsum(counts.long(), 0) - counts.long()
    mapped = starts[ids] + offsets  # [T, K] rows of the packed input
    packed = torch.empty(T * K, H)
    packed[mapped.reshape(-1)] = x.repeat_interleave(K, dim=0)
    out = torch.empty(T * K, H)
    for e in range(E):
        rows = slice(int(starts[e]), int(starts[e] + counts[e]))
        gate, up = (packed[rows] @ held.w13[e].T).chunk(2, dim=-1)
        out[rows] = (F.silu(gate) * up) @ held.w2[e].T
    gathered = (out[mapped] * weights[:, :, None]).sum(dim=1)
    torch.testing.assert_close(gathered, definition(held, x, ids, weights), rtol=1e-5, atol=1e-5)


def test_local_experts_run_the_chosen_backend():
    held = experts()
    x, ids, weights = routing()
    calls = []

    def spy(*args, all_held=False):
        calls.append(all_held)
        return torch_grouped_swiglu(*args)

    out = LocalExperts({1: held}, ExpertCompute("torch", spy)).forward(1, x, ids.clamp(min=0), weights)
    assert calls == [True]  # every expert held: a backend may take DeepSpeed's all-pairs path
    assert out.shape == (T, H)


def test_device_option_names_the_bad_value():
    for good in ("auto", "cpu", "cuda", "cuda:1"):
        assert check_device(good) == good
    for bad in ("gpu", "cpu:0", "auto:1", "cuda:x", "", "CUDA", 3):
        with pytest.raises(ValueError, match="device must be auto, cpu, cuda or cuda:N"):
            check_device(bad)
    with pytest.raises(ValueError, match="device must be"):
        EngineOptions(device="gpu")
    with pytest.raises(ValueError, match="expert_backend must be one of"):
        EngineOptions(expert_backend="cutlass")


@no_cuda
def test_without_cuda_auto_is_cpu_and_cuda_is_a_clear_error(tiny_model_dir):
    from glm_ray import LLM

    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("auto", gpus_assigned=1) == torch.device("cpu")
    with pytest.raises(ValueError, match="device 'cuda:0': CUDA is not available.*use device cpu or auto"):
        resolve_device("cuda:0")
    with pytest.raises(ValueError, match="CUDA is not available"):
        LLM(tiny_model_dir, device="cuda")
    with pytest.raises(ValueError, match="deepspeed needs CUDA"):
        LLM(tiny_model_dir, device="cpu", expert_backend="deepspeed")


def test_serve_config_and_cli_check_the_device():
    from pydantic import ValidationError

    from glm_ray.cli import build_parser
    from glm_ray.serving.config import ServeConfig

    assert ServeConfig(device="cuda:0", expert_backend="torch").device == "cuda:0"
    with pytest.raises(ValidationError, match="device must be"):
        ServeConfig(device="gpu0")
    with pytest.raises(ValidationError):
        ServeConfig(expert_backend="cutlass")
    args = build_parser().parse_args(["serve", "--device", "cuda:1", "--expert-backend", "torch"])
    assert (args.device, args.expert_backend) == ("cuda:1", "torch")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--device", "tpu"])


def test_staging_on_cpu_passes_tensors_through_and_buffers_are_reused():
    staging = HostStaging("cpu")
    t = torch.randn(3, 4)
    assert staging.to_host("x", t) is t  # nothing to copy on a CPU
    assert staging.to_device("x", t, torch.bfloat16).dtype == torch.bfloat16
    a = staging.buffer("reply", (10, 16), torch.float32)
    b = staging.buffer("reply", (7, 16), torch.float32)  # smaller: the same storage
    c = staging.buffer("reply", (3, 5), torch.bfloat16)
    assert a.data_ptr() == b.data_ptr() == c.data_ptr() and staging.allocations == 1
    d = staging.buffer("reply", (100, 16), torch.float32)  # larger: grows once, to a power of two
    assert d.shape == (100, 16) and staging.allocations == 2
    assert staging.buffer("reply", (90, 16), torch.float32).data_ptr() == d.data_ptr()
