"""The `deepspeed` expert backend: DeepSpeed inference-v2's ragged MoE kernels, GLM's router kept.

DeepSpeed's gating kernel is softmax top-k; GLM routes by sigmoid with group-limited top-k and a
correction bias (glm-spec §3.4), so our router (model/moe.py) picks the experts and weights and
this module hands DeepSpeed what its gating kernel would have made:
- `expert_counts` int32 [E], `assignments` int32 [T, K] (slots), `offsets` int32 [T, K] (the
  pair's row within its expert's rows, a permutation of 0..count-1 per expert), and the scaled
  weights fp32 [T, K] as `scores`; the gather sums `scores * rows` unnormalised (GLM normalises
  and scales in its router already).

GLM's experts are gated SwiGLU: down(silu(gate(x)) * up(x)). DeepSpeed's MoE GEMM fuses only
non-gated activations into its epilogue, so the mapping is
    MoEGEMM(identity): [P, H] x [E, H, 2I] -> [P, 2I], the columns interleaved (2j gate, 2j+1 up);
    CUDAGatedActivation(SiGLU): [P, 2I] -> [P, I] = silu(even columns) * odd columns;
    MoEGEMM(identity): [P, I] x [E, I, H] -> [P, H].
Our w13 [E, 2I, H] (gate rows, then up rows) becomes [E, H, 2I] with gate and up rows
interleaved (`to_deepspeed_layout`), w2 [E, H, I] becomes [E, I, H]: both made once per layer.

Where a group holds only some experts, a token's K pairs are partly elsewhere (-1). DeepSpeed's
scatter and gather take a token's pairs all or none, so there the pairs are sorted by expert in
torch (as the torch backend does) and only the two GEMMs and the activation are DeepSpeed's.

Facts read from DeepSpeed (edaa7221) and DeepSpeed-Kernels (d5dde7b): scatter/gather take top-k
1, 2, 4 or 8, fp16/bf16, hidden <= 12288 and a multiple of 8, E <= 256; the CUTLASS MoE GEMM
comes from the `deepspeed-kernels` wheel (import `dskernels`, last built 2023-10), whose
dispatch covers sm_70..sm_89 only ("Arch unsupported for MoE GEMM" otherwise). Loading runs a
small problem through every kernel and compares it with the torch backend, so a kernel that
builds but cannot run here is reported at start-up, by name, with its error.
"""

from __future__ import annotations

import torch

from glm_ray.experts.compute import ExpertCompute, expert_counts, sorted_moe, torch_grouped_swiglu

SUPPORTED_TOP_K = (1, 2, 4, 8)
MAX_EXPERTS = 256
MAX_HIDDEN = 12288


class DeepSpeedUnavailable(RuntimeError):
    """A DeepSpeed kernel cannot be built, loaded or run here; the message names it and says why."""


def to_deepspeed_layout(w13: torch.Tensor, w2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w13 [E, 2I, H] (gate rows then up rows), w2 [E, H, I] -> ([E, H, 2I] interleaved, [E, I, H])."""
    e, two_i, h = w13.shape
    gate, up = w13.view(e, 2, two_i // 2, h).unbind(1)  # [E, I, H] each
    interleaved = torch.stack((gate, up), dim=2).reshape(e, two_i, h)  # rows g0, u0, g1, u1, ...
    return interleaved.transpose(1, 2).contiguous(), w2.transpose(1, 2).contiguous()


def ragged_offsets(local_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(expert_counts int32 [E], offsets int32 [T, K]) for pairs all held here: each pair's row
    within its expert's rows, in token order (deterministic, unlike DeepSpeed's atomics)."""
    flat = local_ids.reshape(-1).long()
    counts = expert_counts(flat, num_experts)
    order = torch.argsort(flat, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    offsets = torch.empty_like(flat)
    offsets[order] = torch.arange(flat.numel(), device=flat.device) - starts[flat[order]]
    return counts.to(torch.int32), offsets.to(torch.int32).view(local_ids.shape)


class DeepSpeedKernels:
    """The kernel objects for one dtype and shape (hidden H, expert width I)."""

    def __init__(self, dtype: torch.dtype, hidden: int, intermediate: int):
        self.hidden, self.intermediate = hidden, intermediate
        try:
            from deepspeed.inference.v2.inference_utils import ActivationType, DtypeEnum
        except ImportError as e:
            raise DeepSpeedUnavailable(f"deepspeed is not installed ({e}); pip install 'glm-ray[deepspeed]' "
                                       "deepspeed-kernels") from None
        if dtype not in (torch.bfloat16, torch.float16):
            raise DeepSpeedUnavailable(f"DeepSpeed's MoE kernels take bfloat16/float16, the model is {dtype}")
        ds_dtype = DtypeEnum.bf16 if dtype == torch.bfloat16 else DtypeEnum.fp16
        # identity both ways: one kernel object serves both GEMMs
        self.gemm = _build("cutlass_ops MoEGEMM", "deepspeed.inference.v2.kernels.cutlass_ops", "MoEGEMM",
                           ds_dtype, ActivationType.IDENTITY)
        self.activation = _build("inference_core_ops CUDAGatedActivation", "deepspeed.inference.v2.kernels.core_ops",
                                 "CUDAGatedActivation", 2 * intermediate, dtype, ActivationType.SiGLU)
        self.scatter = self.gather = None
        if hidden % 8 == 0 and hidden <= MAX_HIDDEN:
            self.scatter = _build("ragged_device_ops MoEScatter", "deepspeed.inference.v2.kernels.ragged_ops",
                                  "MoEScatter", ds_dtype, hidden)
            self.gather = _build("ragged_device_ops MoEGather", "deepspeed.inference.v2.kernels.ragged_ops",
                                 "MoEGather", ds_dtype, hidden, normalize_scores=False)

    def mlp(self, x: torch.Tensor, cumsum: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
        """Rows of x grouped by expert (cumsum int64 [E], inclusive) -> [rows, H]."""
        rows = x.shape[0]
        gated = torch.empty(rows, 2 * self.intermediate, dtype=x.dtype, device=x.device)
        self.gemm(gated, x, w1, cumsum)
        inner = torch.empty(rows, self.intermediate, dtype=x.dtype, device=x.device)
        self.activation(inner, gated)
        out = torch.empty(rows, self.hidden, dtype=x.dtype, device=x.device)
        self.gemm(out, inner, w2, cumsum)
        return out

    def ragged(self, hidden_states, local_ids, topk_weights, w1, w2) -> torch.Tensor:
        """Every pair held here: DeepSpeed's scatter, GEMMs, activation and gather."""
        t, k = local_ids.shape
        e = w1.shape[0]
        device = hidden_states.device
        counts, offsets = ragged_offsets(local_ids, e)
        moe_input = torch.empty(t * k, self.hidden, dtype=hidden_states.dtype, device=device)
        cumsum = torch.empty(e, dtype=torch.int64, device=device)
        mapped = torch.empty(t, k, dtype=torch.int32, device=device)
        self.scatter(moe_input, cumsum, mapped, hidden_states.contiguous(), counts, local_ids.to(torch.int32),
                     offsets)
        moe_output = self.mlp(moe_input, cumsum, w1, w2)
        out = torch.empty(t, self.hidden, dtype=hidden_states.dtype, device=device)
        self.gather(out, moe_output, topk_weights.float().contiguous(), mapped, counts)
        return out.float()

    def sorted(self, hidden_states, local_ids, topk_weights, w1, w2) -> torch.Tensor:
        """Some pairs elsewhere (-1): sorted in torch, DeepSpeed's GEMMs over the rows."""
        return sorted_moe(hidden_states, local_ids, topk_weights, w1.shape[0],
                          lambda x, counts: self.mlp(x.contiguous(), torch.cumsum(counts, 0), w1, w2))


class DeepSpeedExperts:
    """The ExpertCompute fn: kernels per (dtype, H, I), weights in DeepSpeed's layout per layer.
    `all_held` (every pair's expert is here, none -1) takes DeepSpeed's scatter/gather; a request
    from the network never does (a stray -1 there would write out of bounds)."""

    def __init__(self):
        self._kernels: dict[tuple, DeepSpeedKernels] = {}

    def kernels(self, dtype: torch.dtype, hidden: int, intermediate: int) -> DeepSpeedKernels:
        key = (dtype, hidden, intermediate)
        if key not in self._kernels:
            self._kernels[key] = DeepSpeedKernels(dtype, hidden, intermediate)
        return self._kernels[key]

    def __call__(self, hidden_states, local_ids, topk_weights, held, all_held: bool = False) -> torch.Tensor:
        if local_ids.shape[0] == 0:
            return torch.zeros(hidden_states.shape, dtype=torch.float32, device=hidden_states.device)
        w1, w2 = _prepared(held)
        e, h, two_i = w1.shape
        kernels = self.kernels(w1.dtype, h, two_i // 2)
        if all_held and kernels.scatter is not None and local_ids.shape[1] in SUPPORTED_TOP_K and e <= MAX_EXPERTS:
            return kernels.ragged(hidden_states, local_ids, topk_weights, w1, w2)
        return kernels.sorted(hidden_states, local_ids, topk_weights, w1, w2)


def _build(what: str, module: str, name: str, *args, **kwargs):
    """One kernel object; DeepSpeedUnavailable naming it and the builder's own error."""
    try:
        import importlib

        return getattr(importlib.import_module(module), name)(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - builders raise RuntimeError, ImportError, MissingCUDAException...
        raise DeepSpeedUnavailable(f"{what} cannot be loaded: {type(e).__name__}: {e}") from None


def _prepared(held) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's weights in DeepSpeed's layout, made once and kept beside them."""
    cached = getattr(held, "_deepspeed", None)
    if cached is None or cached[0] is not held.w13:
        cached = (held.w13, *to_deepspeed_layout(held.w13, held.w2))
        held._deepspeed = cached
    return cached[1], cached[2]


def load_deepspeed(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> ExpertCompute:
    """Build the kernels and run a small problem through both paths against the torch backend;
    DeepSpeedUnavailable (which kernel, why) if any of it fails, since a kernel that builds may
    still refuse this GPU at its first call."""
    from glm_ray.experts.local import ExpertWeights

    if torch.device(device).type != "cuda":
        raise DeepSpeedUnavailable(f"DeepSpeed's MoE kernels need CUDA, the device is {device}")
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        raise DeepSpeedUnavailable(f"DeepSpeed's ragged and CUTLASS ops build for sm_80 and newer; this GPU is "
                                   f"sm_{major}{minor}")
    backend = DeepSpeedExperts()
    gen = torch.Generator().manual_seed(0)
    e, t, k, hidden, intermediate = 8, 24, 4, 256, 128
    held = ExpertWeights(range(e), (torch.randn(e, 2 * intermediate, hidden, generator=gen) / 16).to(device, dtype),
                         (torch.randn(e, hidden, intermediate, generator=gen) / 12).to(device, dtype), e)
    x = torch.randn(t, hidden, generator=gen).to(device, dtype)
    ids = torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(t)]).to(device)
    weights = torch.rand(t, k, generator=gen).to(device)
    partial = ids.masked_fill(torch.rand(t, k, generator=gen).to(device) < 0.3, -1)
    for path, local_ids, all_held in (("scatter/gather", ids, True), ("sorted", partial, False)):
        want = torch_grouped_swiglu(x, local_ids, weights, held)
        try:
            got = backend(x, local_ids, weights, held, all_held=all_held)
            torch.cuda.synchronize(device)
        except DeepSpeedUnavailable:
            raise
        except Exception as e:  # noqa: BLE001 - e.g. the CUTLASS dispatch's "Arch unsupported for MoE GEMM"
            raise DeepSpeedUnavailable(f"the {path} path failed on {torch.cuda.get_device_name(device)} "
                                       f"(sm_{major}{minor}): {type(e).__name__}: {e}") from None
        err = float((got - want).abs().max() / want.abs().max().clamp(min=1e-6))
        if not err < 2e-2:
            raise DeepSpeedUnavailable(f"the {path} path disagrees with the torch backend on a probe "
                                       f"(max error {err:.3g} of the largest output)")
    return ExpertCompute("deepspeed", backend)
