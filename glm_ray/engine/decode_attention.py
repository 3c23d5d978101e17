"""The C decode-attention kernel (decode_attention.c), built and loaded by glm_ray/native.

A decode step's queries attend to their sequences' keys read in place from the paged cache:
torch's path gathers each sequence's blocks into a padded copy per layer and masks the padding,
which costs more than the attention itself at decode sizes (BENCHMARKS.md, issue 18). Its sums
run in another order than torch's SDPA (the exact path transformers takes too), so greedy outputs
can part from transformers' at near ties: an engine option (`decode_attention="cpu-kernel"`),
off by default. Where it cannot run (see glm_ray/native, or not fp32 on the CPU) asking for it is
an error at engine start.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from glm_ray import native
from glm_ray.config import ModelConfig

SOURCE = Path(__file__).with_name("decode_attention.c")
MAX_GROUP = 16  # query heads per KV head the kernel handles (decode_attention.c)


@functools.cache
def load() -> ctypes.CDLL | None:
    lib = native.load(SOURCE, "decode attention")
    if lib is not None:
        p, i64 = ctypes.c_void_p, ctypes.c_int64
        lib.glm_ray_decode_attention.argtypes = [p, p, i64, p, p, p, i64, p, i64, i64, i64, i64, ctypes.c_float, p,
                                                 ctypes.c_int]
        lib.glm_ray_decode_attention.restype = ctypes.c_int
    return lib


def unusable_reason(config: ModelConfig, dtype: torch.dtype, device: torch.device | str) -> str | None:
    """Why the kernel cannot attend for this model here, or None when it can."""
    if torch.device(device).type != "cpu" or dtype != torch.float32:
        return f"it computes fp32 on the CPU, this engine {dtype} on {device}"
    group = config.num_attention_heads // config.num_key_value_heads
    if group > MAX_GROUP:
        return f"{group} query heads per KV head, the kernel takes at most {MAX_GROUP}"
    if load() is None:
        return native.unavailable_reason() or "the kernel did not build (see the log)"
    return None


class DecodeBatch:
    """Decode sequences attending in one kernel call per layer: their query rows, block tables
    (padded to the longest with block 0, never read) and lengths, built once per step."""

    def __init__(self, rows: list[int], tables: list[list[int]], lens: list[int]):
        width = max(map(len, tables))
        self.rows = torch.tensor(rows, dtype=torch.int64)
        self.tables = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int64)
        self.lens = torch.tensor(lens, dtype=torch.int64)
        self.cost = float(sum(lens))  # keys read per query head, summed

    def attend(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, scale: float, out: torch.Tensor,
               threads: int) -> None:
        """q/out [T, Hq, D] contiguous fp32: writes out[rows]."""
        _, hq, d = q.shape
        _, block_size, hkv, _ = k_cache.shape
        rc = load().glm_ray_decode_attention(
            q.data_ptr(), self.rows.data_ptr(), len(self.rows), k_cache.data_ptr(), v_cache.data_ptr(),
            self.tables.data_ptr(), self.tables.shape[1], self.lens.data_ptr(), block_size, hq, hkv, d, scale,
            out.data_ptr(), threads)
        if rc != 0:
            raise MemoryError("decode attention kernel: could not allocate its scratch memory")
