"""How a process computes the routed experts it holds: the `expert_backend` option.

- `cpu-kernel`: the CPU paths of local.py (the C kernel, a padded bmm or grouped_mm, chosen by
  tokens per expert); CPU only. The default there.
- `torch`: pairs sorted by expert, then one grouped GEMM per projection (`grouped_mm` where this
  torch has it for the device and dtype, per-expert matmuls otherwise); CPU and CUDA. On CUDA it
  never waits for the GPU: no count is read back to the host.
- `deepspeed`: DeepSpeed inference-v2's ragged MoE kernels (experts/deepspeed_moe.py); CUDA only.
- `auto`: on CUDA, deepspeed when its kernels load, else torch with a warning saying why; on
  CPU, cpu-kernel.

Every backend maps (hidden_states [T, H], local_ids [T, K] (slots, -1 = not here), topk_weights
[T, K] fp32, the layer's ExpertWeights) -> the fp32 weighted sum [T, H]; `reference_moe` in
local.py is the definition they are all tested against. Legend: P = T*K pairs, E experts held.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

BACKENDS = ("auto", "cpu-kernel", "torch", "deepspeed")


def check_backend(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"expert_backend must be one of {', '.join(BACKENDS)}, got {name!r}")
    return name


@dataclass(frozen=True)
class ExpertCompute:
    """A chosen backend: `fn(hidden_states, local_ids, topk_weights, held, all_held) -> [T, H] fp32`;
    all_held: the caller vouches that no pair is -1 (every expert routed to is held here)."""

    name: str
    fn: Callable
    note: str = ""  # why this one, when it is not the one asked for

    def __call__(self, hidden_states, local_ids, topk_weights, held, all_held: bool = False) -> torch.Tensor:
        return self.fn(hidden_states, local_ids, topk_weights, held, all_held=all_held)


def select_compute(name: str, device: torch.device, load_deepspeed: Callable | None = None,
                   kernel_threads: int | None = None) -> ExpertCompute:
    """The backend `name` asks for on `device`. An explicit choice that cannot run there is a
    ValueError naming why; `auto` falls back (deepspeed -> torch on CUDA) with a warning.
    load_deepspeed: returns the DeepSpeed compute or raises DeepSpeedUnavailable (a test seam).
    kernel_threads: threads of cpu-kernel's C kernel (None: torch's intra-op threads)."""
    check_backend(name)
    device = torch.device(device)
    if name == "cpu-kernel":
        if device.type != "cpu":
            raise ValueError(f"expert_backend cpu-kernel runs on CPU only, and this process computes on {device}: "
                             "use torch or deepspeed (or auto)")
        return ExpertCompute("cpu-kernel", functools.partial(_cpu_kernel, kernel_threads=kernel_threads))
    if name == "torch":
        return ExpertCompute("torch", torch_grouped_swiglu)
    if device.type != "cuda":
        if name == "auto":
            return ExpertCompute("cpu-kernel", functools.partial(_cpu_kernel, kernel_threads=kernel_threads))
        raise ValueError(f"expert_backend deepspeed needs CUDA, and this process computes on {device}: "
                         "use device cuda, or expert_backend torch / cpu-kernel")
    if load_deepspeed is None:
        from glm_ray.experts.deepspeed_moe import load_deepspeed
    from glm_ray.experts.deepspeed_moe import DeepSpeedUnavailable

    try:
        return load_deepspeed(device)
    except DeepSpeedUnavailable as e:
        if name == "deepspeed":
            raise ValueError(f"expert_backend deepspeed: {e}") from None
        log.warning("expert_backend auto: DeepSpeed's MoE kernels are unavailable (%s); using the torch backend", e)
        return ExpertCompute("torch", torch_grouped_swiglu, note=f"deepspeed unavailable: {e}")


def _cpu_kernel(hidden_states, local_ids, topk_weights, held, all_held: bool = False,
                kernel_threads: int | None = None) -> torch.Tensor:
    from glm_ray.experts.local import grouped_swiglu

    return grouped_swiglu(hidden_states, local_ids, topk_weights, held.w13, held.w2, kernel_threads)


def torch_grouped_swiglu(hidden_states, local_ids, topk_weights, held, all_held: bool = False) -> torch.Tensor:
    """The `torch` backend: one grouped GEMM per projection where this torch has it for the
    device and dtype, a matmul pair per expert otherwise."""
    w13, w2 = held.w13, held.w2
    if w13.dtype != hidden_states.dtype:  # held narrower (model/loader.py keeps that for cpu-kernel only)
        w13, w2 = w13.to(hidden_states.dtype), w2.to(hidden_states.dtype)
    grouped = _grouped_mm_works(hidden_states.device.type, hidden_states.dtype)
    experts = grouped_mm_experts if grouped else looped_experts
    return sorted_moe(hidden_states, local_ids, topk_weights, w13.shape[0],
                      lambda x, counts: experts(x, counts, w13, w2))


def sorted_moe(hidden_states, local_ids, topk_weights, num_experts: int, run) -> torch.Tensor:
    """Pairs sorted by expert, `run(x [P, H] grouped by expert, counts [E]) -> [P, H]` over them,
    then each token's weighted sum in fp32. Skipped pairs (-1) sort after every expert's rows,
    where `run` need not reach: their rows may come out undefined and are dropped by a select.
    Nothing is read back to the host."""
    t, k = local_ids.shape
    if t == 0:
        return torch.zeros(hidden_states.shape, dtype=torch.float32, device=hidden_states.device)
    flat = local_ids.reshape(-1)  # [P]
    key = torch.where(flat < 0, num_experts, flat)
    order = torch.argsort(key, stable=True)
    y = run(hidden_states.index_select(0, order // k), expert_counts(key, num_experts))
    kept = (key[order] < num_experts)[:, None]  # [P, 1]
    pairs = torch.zeros(t * k, hidden_states.shape[1], dtype=torch.float32, device=hidden_states.device)
    pairs[order] = torch.where(kept, y.float() * topk_weights.reshape(-1)[order, None].float(), 0.0)
    return pairs.view(t, k, pairs.shape[1]).sum(dim=1)


def expert_counts(key: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Pairs per expert, key [P] in 0..num_experts (num_experts = skipped, not counted). A
    scatter-add into a fixed size: `bincount` would read the largest key back to size its output,
    a host sync on a GPU."""
    counts = torch.zeros(num_experts + 1, dtype=torch.long, device=key.device)
    return counts.scatter_add_(0, key, torch.ones_like(key))[:num_experts]


GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def grouped_mm_experts(x, counts, w13, w2) -> torch.Tensor:
    """All experts in two grouped matmuls: rows [offs[e-1], offs[e]) use expert e -> [P, H] fp32."""
    if x.shape[0] == 0:
        return x.float()
    offs = torch.cumsum(counts, 0).to(torch.int32)
    gate, up = GROUPED_MM(x, w13.transpose(1, 2), offs=offs).chunk(2, dim=-1)
    return GROUPED_MM((F.silu(gate) * up).contiguous(), w2.transpose(1, 2), offs=offs).float()


def looped_experts(x, counts, w13, w2) -> torch.Tensor:
    """One matmul pair per active expert -> [P, H] fp32: the plain path, and the fallback without
    grouped_mm (it reads the counts back: a host sync on a GPU)."""
    y = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    offset = 0
    for slot, n in enumerate(counts.tolist()):
        if n == 0:
            continue
        gate, up = F.linear(x[offset:offset + n], w13[slot]).chunk(2, dim=-1)
        y[offset:offset + n] = F.linear(F.silu(gate) * up, w2[slot])
        offset += n
    return y


@functools.lru_cache(maxsize=None)
def _grouped_mm_works(device_type: str, dtype: torch.dtype) -> bool:
    """Whether grouped_mm runs here for this dtype (CUDA builds take bf16 on recent GPUs only),
    tried once on a small problem against per-expert matmuls."""
    if GROUPED_MM is None:
        return False
    device = torch.device(device_type)
    try:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(48, 32, generator=gen).to(device, dtype)
        w = torch.randn(3, 16, 32, generator=gen).to(device, dtype)
        offs = torch.tensor([16, 16, 40], dtype=torch.int32, device=device)
        got = GROUPED_MM(x, w.transpose(1, 2), offs=offs)[:40].float()
        want = torch.cat([x[:16] @ w[0].T, x[16:40] @ w[2].T]).float()
        ok = bool(torch.allclose(got, want, rtol=2e-2, atol=2e-2))
    except (RuntimeError, TypeError, NotImplementedError) as e:
        log.info("grouped_mm unavailable on %s for %s (%s): per-expert matmuls instead", device_type, dtype, e)
        return False
    if not ok:
        log.warning("grouped_mm on %s for %s disagrees with matmul: per-expert matmuls instead", device_type, dtype)
    return ok
