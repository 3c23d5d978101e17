"""The GPU paths: expert backends in bf16 against the fp32 definition, the engine on CUDA against
the CPU engine, and the disaggregated wire from a GPU (pinned staging). Run where CUDA is; they
skip elsewhere with the reason. `python -m glm_ray.bench.gpu` measures the same paths."""

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (no GPU visible to torch here)")

T, H, I, E, K = 300, 256, 128, 16, 8


def _problem(dtype, skip=0.0, seed=0):
    from glm_ray.experts.local import ExpertWeights

    g = torch.Generator().manual_seed(seed)
    held = ExpertWeights(range(E), (torch.randn(E, 2 * I, H, generator=g) / 16).to("cuda", dtype),
                         (torch.randn(E, H, I, generator=g) / 12).to("cuda", dtype), E).to_slots_on("cuda")
    x = torch.randn(T, H, generator=g).to("cuda", dtype)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    ids = ids.masked_fill(torch.rand(T, K, generator=g) < skip, -1).to("cuda")
    return held, x, ids, torch.rand(T, K, generator=g).to("cuda")


def _definition(held, x, ids, weights):
    from glm_ray.experts.local import reference_moe

    return reference_moe(x.float().cpu(), ids.cpu(), weights.cpu(),
                         {e: (held.w13[e].float().cpu(), held.w2[e].float().cpu()) for e in range(E)})


# bf16 rounds each operand to 8 mantissa bits (2^-8 relative); with fp32 accumulation the two
# GEMMs and the activation stay within a few of those steps of the output scale. 3% of the
# largest output catches any wrong expert, row or weight (off by the output scale itself).
BF16_TOLERANCE = 0.03


@pytest.mark.parametrize("skip", [0.0, 0.4])
def test_torch_backend_in_bf16_on_cuda(skip):
    from glm_ray.experts.compute import torch_grouped_swiglu

    held, x, ids, w = _problem(torch.bfloat16, skip)
    want = _definition(held, x, ids, w)
    got = torch_grouped_swiglu(x, ids, w, held).cpu()
    assert float((got - want).abs().max()) <= BF16_TOLERANCE * float(want.abs().max())


@pytest.mark.parametrize("skip", [0.0, 0.4])
def test_deepspeed_backend_in_bf16_on_cuda(skip):
    from glm_ray.experts.deepspeed_moe import DeepSpeedUnavailable, load_deepspeed

    try:
        compute = load_deepspeed(torch.device("cuda"))
    except DeepSpeedUnavailable as e:
        pytest.skip(f"DeepSpeed's MoE kernels cannot run here: {e}")
    held, x, ids, w = _problem(torch.bfloat16, skip)
    want = _definition(held, x, ids, w)
    got = compute(x, ids, w, held, all_held=skip == 0.0).cpu()
    assert float((got - want).abs().max()) <= BF16_TOLERANCE * float(want.abs().max())


def test_engine_on_cuda_agrees_with_the_cpu_engine(tiny_model_dir):
    """fp32 on both (TF32 off, torch's default for matmul): greedy tokens identical over the
    workload; logprobs within 1e-3."""
    from glm_ray import LLM, SamplingParams

    prompts = [[1, 5, 9, 200, 17], [3, 3, 3], [900, 14, 77, 2, 41, 8, 600], list(range(40, 90))]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, logprobs=1)
    cpu = LLM(tiny_model_dir, dtype="float32", device="cpu").generate([{"prompt_token_ids": p} for p in prompts],
                                                                      params)
    for backend in ("torch", "auto"):
        gpu = LLM(tiny_model_dir, dtype="float32", device="cuda", expert_backend=backend).generate(
            [{"prompt_token_ids": p} for p in prompts], params)
        for a, b in zip(cpu, gpu):
            assert a.outputs[0].token_ids == b.outputs[0].token_ids
            for la, lb in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
                tok = next(iter(la))
                assert abs(la[tok].logprob - lb[tok].logprob) < 1e-3


def test_seeded_sampling_on_cuda_repeats(tiny_model_dir):
    from glm_ray import LLM, SamplingParams

    llm = LLM(tiny_model_dir, dtype="float32", device="cuda")
    params = SamplingParams(max_tokens=16, temperature=0.8, seed=7, ignore_eos=True)
    first = llm.generate(["Hello"], params)[0].outputs[0].token_ids
    assert llm.generate(["Hello", "other"], [params, SamplingParams(max_tokens=4)])[0].outputs[0].token_ids == first


def test_remote_experts_from_cuda_equal_local_and_reuse_pinned_buffers(tiny_model_dir):
    from glm_ray.config import load_model_config
    from glm_ray.experts.local import LocalExperts
    from glm_ray.experts.remote import EventLoopThread, RemoteExperts, StaticReplicas
    from glm_ray.experts.server import ExpertServer
    from glm_ray.model.loader import load_weights
    from glm_ray.router.placement import Placement

    config = load_model_config(tiny_model_dir)
    local = LocalExperts(load_weights(tiny_model_dir, dtype="float32", dense=False, device="cuda").experts)
    placement = Placement.contiguous(config.n_routed_experts, 2)
    loop = EventLoopThread("gpu-test-servers")
    servers = [ExpertServer(load_weights(tiny_model_dir, dtype="float32", dense=False, device="cuda",
                                         expert_ids=placement.experts_of(g)).experts, g) for g in range(2)]
    replicas = StaticReplicas({g: [loop.run(s.start())] for g, s in enumerate(servers)})
    try:
        with RemoteExperts(placement, replicas, device="cuda") as remote:
            g = torch.Generator().manual_seed(0)
            for step in range(6):
                x = torch.randn(40, config.hidden_size, generator=g).cuda()
                ids = torch.stack([torch.randperm(config.n_routed_experts, generator=g)[:config.num_experts_per_tok]
                                   for _ in range(40)]).cuda()
                w = torch.rand(40, config.num_experts_per_tok, generator=g).cuda()
                layer = config.moe_layers[step % len(config.moe_layers)]
                got = remote.forward(layer, x, ids, w)
                assert got.device.type == "cuda"
                torch.testing.assert_close(got, local.forward(layer, x, ids, w), rtol=1e-5, atol=1e-5)
                if step == 1:
                    warm = remote.staging.allocations
            assert remote.staging.allocations == warm  # no host allocation per layer once warm
    finally:
        for s in servers:
            loop.run(s.stop(None))
        loop.stop()
