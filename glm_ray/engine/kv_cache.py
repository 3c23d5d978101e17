"""Paged KV cache storage and the attention backend that reads and writes it.

Storage is one flat slot array per layer ([num_blocks * block_size, Hkv, D] for k and for v); a
sequence's block table maps its positions to slots. Prefill chunks attend one by one; decode
tokens (one query each) attend together in one padded, masked call per layer. Both use the same
`causal_attention` definition as the reference cache for the math.
Legend: T step tokens, B decode sequences, L longest context, Hq/Hkv heads, D head_dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from glm_ray.config import ModelConfig
from glm_ray.model.attention import causal_attention


def kv_bytes_per_token(config: ModelConfig, dtype: torch.dtype) -> int:
    return 2 * config.num_hidden_layers * config.kv_size * dtype.itemsize


class PagedKVCache:
    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype):
        self.num_blocks, self.block_size = num_blocks, block_size
        shape = (num_blocks * block_size, config.num_key_value_heads, config.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype) for _ in range(config.num_hidden_layers)]

    def slots(self, block_table: list[int], num_positions: int) -> torch.Tensor:
        """Slot of every position 0..num_positions-1 of a sequence -> [num_positions]."""
        blocks = torch.tensor(block_table, dtype=torch.long)
        per_block = blocks[:, None] * self.block_size + torch.arange(self.block_size)
        return per_block.reshape(-1)[:num_positions]


@dataclass
class StepChunk:
    """One sequence's share of a step: its queries are tokens [offset, offset + num_tokens) of the
    flat batch; `context_slots` are the slots of all its positions up to the last query."""

    offset: int
    num_tokens: int
    context_slots: torch.Tensor  # [context_len]


class PagedAttention:
    """`AttentionBackend` over a PagedKVCache for one step."""

    def __init__(self, cache: PagedKVCache, chunks: list[StepChunk]):
        self.cache = cache
        self.slot_mapping = torch.cat([c.context_slots[-c.num_tokens:] for c in chunks])  # [T]
        self.prefills = [c for c in chunks if c.num_tokens > 1]
        decodes = [c for c in chunks if c.num_tokens == 1]
        self.decode_rows = torch.tensor([c.offset for c in decodes], dtype=torch.long)
        if decodes:
            lens = torch.tensor([c.context_slots.numel() for c in decodes])
            longest = int(lens.max())
            padded = torch.zeros(len(decodes), longest, dtype=torch.long)  # [B, L], pad with slot 0
            for i, c in enumerate(decodes):
                padded[i, :c.context_slots.numel()] = c.context_slots
            self.decode_slots = padded
            self.decode_mask = (torch.arange(longest)[None, :] < lens[:, None])[:, None, None, :]  # [B,1,1,L]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        k_cache, v_cache = self.cache.k[layer], self.cache.v[layer]
        k_cache[self.slot_mapping] = k
        v_cache[self.slot_mapping] = v
        out = torch.empty_like(q)
        for c in self.prefills:
            rows = slice(c.offset, c.offset + c.num_tokens)
            out[rows] = causal_attention(q[rows], k_cache[c.context_slots], v_cache[c.context_slots], scale)
        if self.decode_rows.numel():
            qd = q[self.decode_rows][:, :, None, :]  # [B, Hq, 1, D]
            kd = k_cache[self.decode_slots].transpose(1, 2)  # [B, Hkv, L, D]
            vd = v_cache[self.decode_slots].transpose(1, 2)
            od = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=self.decode_mask, scale=scale,
                                                enable_gqa=qd.shape[1] != kd.shape[1])
            out[self.decode_rows] = od[:, :, 0, :]
        return out
