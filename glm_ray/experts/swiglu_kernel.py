"""The C routed-expert kernel (swiglu_kernel.c), built and loaded by glm_ray/native.

Few rows per expert (decode) is where torch's CPU matmuls lose most: each BLAS call packs the
expert's weights before using them for a handful of rows. The kernel reads each weight row once
per expert straight from the checkpoint layout (BENCHMARKS.md, issue 3), and `moe` runs a whole
layer's routed experts in one call: the routing sort, the gather of each expert's rows, the
SwiGLU, the routing weights and each token's sum over its pairs. Where it cannot run (see
glm_ray/native), `load()` returns None and callers keep the torch paths.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from glm_ray import native

SOURCE = Path(__file__).with_name("swiglu_kernel.c")


def unavailable_reason() -> str | None:
    return native.unavailable_reason()


def build() -> Path:
    return native.build(SOURCE)


@functools.cache
def load() -> ctypes.CDLL | None:
    lib = native.load(SOURCE, "routed experts")
    if lib is not None:
        p, i64 = ctypes.c_void_p, ctypes.c_int64
        lib.glm_ray_moe.argtypes = [p, i64, i64, p, p, i64, p, p, ctypes.c_int, p, p, i64, i64, i64, ctypes.c_int]
        lib.glm_ray_moe.restype = ctypes.c_int
        lib.glm_ray_moe_combine.argtypes = [p, i64, p, i64, i64, p, p, i64, ctypes.c_int]
        lib.glm_ray_moe_combine.restype = ctypes.c_int
    return lib


WEIGHT_DTYPES = (torch.float32, torch.bfloat16)


def usable(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> bool:
    """The kernel computes in fp32 on CPU, from weights in their contiguous checkpoint layout held
    in fp32 or in bf16 (widened as they are read: the same bits as weights upcast at load)."""
    return (
        x.dtype == torch.float32 and w13.dtype == w2.dtype and w13.dtype in WEIGHT_DTYPES
        and x.device.type == w13.device.type == w2.device.type == "cpu"
        and w13.is_contiguous() and w2.is_contiguous()
        and load() is not None
    )


def moe(hidden_states: torch.Tensor, local_ids: torch.Tensor, weights: torch.Tensor, w13: torch.Tensor,
        w2: torch.Tensor, max_rows: int, threads: int | None = None) -> torch.Tensor | None:
    """A layer's routed experts whole: hidden_states [T, H] fp32, local_ids [T, K] slots into
    w13/w2 (fp32 or bf16; -1: skipped), weights [T, K] -> [T, H] fp32, sum over k of weight * SwiGLU of the
    pair's expert (skipped pairs add nothing); None when an expert has more than `max_rows` rows
    (large prefills), which the caller leaves to torch's matmuls (experts/local.py: why).
    threads: the kernel's OpenMP threads (None: torch's intra-op threads); each takes (expert,
    rows) items as it gets free, so the result is the same for any count."""
    lib = load()
    t, k = local_ids.shape
    e, two_i, h = w13.shape
    if hidden_states.shape != (t, h) or weights.shape != (t, k) or w2.shape != (e, h, two_i // 2):
        raise ValueError(f"moe: shapes do not agree: hidden_states {tuple(hidden_states.shape)}, local_ids "
                         f"{tuple(local_ids.shape)}, weights {tuple(weights.shape)}, w13 {tuple(w13.shape)}, "
                         f"w2 {tuple(w2.shape)}")
    x = hidden_states.contiguous()
    ids = local_ids.to(torch.int64).contiguous()
    w = weights.to(torch.float32).contiguous()
    pairs = torch.empty(t * k, h, dtype=torch.float32)
    out = torch.empty(t, h, dtype=torch.float32)
    if w13.dtype != w2.dtype or w13.dtype not in WEIGHT_DTYPES:
        raise ValueError(f"moe: weights must both be float32 or both bfloat16, got {w13.dtype} and {w2.dtype}")
    rc = lib.glm_ray_moe(x.data_ptr(), t, k, ids.data_ptr(), w.data_ptr(), e, w13.data_ptr(), w2.data_ptr(),
                         int(w13.dtype == torch.bfloat16), pairs.data_ptr(), out.data_ptr(), h, two_i // 2, max_rows,
                         threads or torch.get_num_threads())
    if rc < 0:
        raise MemoryError("moe kernel: could not allocate its scratch memory")
    return out if rc == 0 else None


def combine(y: torch.Tensor, order: torch.Tensor, t: int, k: int, weights: torch.Tensor,
            threads: int | None = None) -> torch.Tensor:
    """The torch path's last step in one pass: y [n, H] fp32 expert outputs of the kept pairs in
    sorted order, order [n] their indices among the t * k pairs, weights [t, k] -> [t, H] fp32, each
    token's sum over its pairs, in k order, of weight * row (skipped pairs add nothing). The same
    bits as `pairs[order] = y * weights[order]` into zeroed pairs, then `.sum(dim=1)` over k, where
    `combine_matches_torch(k, H)`."""
    lib = load()
    n, h = y.shape
    if (y.dtype != torch.float32 or y.device.type != "cpu" or order.shape != (n,) or weights.shape != (t, k)
            or weights.device.type != "cpu"):
        raise ValueError(f"combine: y {tuple(y.shape)} {y.dtype} on {y.device}, order {tuple(order.shape)}, "
                         f"weights {tuple(weights.shape)} on {weights.device}, for t={t}, k={k}")
    y = y.contiguous()
    idx = order.to(torch.int64).contiguous()
    w = weights.to(torch.float32).contiguous()
    out = torch.empty(t, h, dtype=torch.float32)
    rc = lib.glm_ray_moe_combine(y.data_ptr(), n, idx.data_ptr(), t, k, w.data_ptr(), out.data_ptr(), h,
                                 threads or torch.get_num_threads())
    if rc == -2:
        raise ValueError(f"combine: order holds an index outside 0..{t * k - 1}")
    if rc < 0:
        raise MemoryError("moe combine: could not allocate its index")
    return out


def combine_matches_torch(k: int, hidden: int) -> bool:
    """Whether torch's sum over k adds in k order, as `combine` does: always up to 4 terms; beyond,
    only where H is a multiple of its vector block (64 floats covers AVX2 and AVX-512 builds), else
    it interleaves the terms of the columns left over (GLM: k 8, H 4096 or 5120: in order)."""
    return k <= 4 or hidden % 64 == 0
