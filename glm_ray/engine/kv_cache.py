"""Paged KV cache storage and the attention backend that reads and writes it.

Storage is one block array per layer ([num_blocks, block_size, Hkv, D] for k and for v); a
sequence's block table maps its positions to blocks. Reads gather whole blocks (a block is one
contiguous run of memory, so the copy runs at memory speed), never single slots. Prefill chunks
attend one by one; decode tokens (one query each) attend together in one padded, masked call per
layer, with each KV head's group of query heads batched as that head's queries (no K/V repeat).
Legend: T step tokens, B decode sequences, N blocks, L = N * block_size, Hq/Hkv heads, D head_dim.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

from glm_ray.config import ModelConfig
from glm_ray.engine.attention_workers import AttentionWorkers, balance
from glm_ray.engine.decode_attention import DecodeBatch
from glm_ray.model.attention import causal_attention


def kv_bytes_per_token(config: ModelConfig, dtype: torch.dtype) -> int:
    return 2 * config.num_hidden_layers * config.kv_size * dtype.itemsize


class PagedKVCache:
    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu", decode_kernel: bool = False, kernel_threads: int | None = None):
        """decode_kernel: decode steps attend with the C kernel (engine/decode_attention.py); the
        caller has checked `decode_attention.unusable_reason`. kernel_threads: its threads without
        attention workers (None: torch's)."""
        self.num_blocks, self.block_size = num_blocks, block_size
        self.decode_kernel, self.kernel_threads = decode_kernel, kernel_threads
        self.device = torch.device(device)
        shape = (num_blocks, block_size, config.num_key_value_heads, config.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]


@dataclass
class StepChunk:
    """One sequence's share of a step: its queries are tokens [offset, offset + num_tokens) of the
    flat batch, at positions [context_len - num_tokens, context_len); `blocks` is its block table
    (at least ceil(context_len / block_size) entries)."""

    offset: int
    num_tokens: int
    context_len: int
    blocks: list[int]


class PagedAttention:
    """`AttentionBackend` over a PagedKVCache for one step."""

    def __init__(self, cache: PagedKVCache, chunks: list[StepChunk], workers: AttentionWorkers | None = None):
        """workers: threads to share the step's attention calls among (default: this thread)."""
        self.cache, self.workers = cache, workers
        bs = cache.block_size
        slots = []  # the slot (block * block_size + offset) each new token is written to, as plain ints
        for c in chunks:
            for pos in range(c.context_len - c.num_tokens, c.context_len):
                slots.append(c.blocks[pos // bs] * bs + pos % bs)
        device = cache.device
        self.slot_mapping = torch.tensor(slots, dtype=torch.long, device=device)  # [T]
        # a whole prompt attends to this step's own keys; a continued one gathers its earlier blocks
        self.prefills = [(c, None if c.num_tokens == c.context_len else
                          torch.tensor(c.blocks[:_num_blocks(c.context_len, bs)], dtype=torch.long, device=device))
                         for c in chunks if c.num_tokens > 1]
        decodes = sorted((c for c in chunks if c.num_tokens == 1), key=lambda c: c.context_len)
        self.decode_batches, self.decode_buckets = [], []
        if decodes and cache.decode_kernel:
            # the C kernel reads each sequence's blocks in place; with workers, one share each
            shares = balance([c.context_len for c in decodes], workers.n) if workers else [range(len(decodes))]
            self.decode_batches = [DecodeBatch([decodes[i].offset for i in share],
                                               [decodes[i].blocks[:_num_blocks(decodes[i].context_len, bs)]
                                                for i in share],
                                               [decodes[i].context_len for i in share]) for share in shares if share]
        else:
            # decodes of similar length attend together: each bucket is padded to its own longest
            self.decode_buckets = [_DecodeBucket(part, bs, cache.k[0].dtype, device) for part in _split(decodes)]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        k_cache, v_cache = self.cache.k[layer], self.cache.v[layer]
        flat_k, flat_v = k_cache.view(-1, *k_cache.shape[2:]), v_cache.view(-1, *v_cache.shape[2:])
        flat_k[self.slot_mapping] = k
        flat_v[self.slot_mapping] = v

        def prefill(c: StepChunk, blocks: torch.Tensor | None):
            rows = slice(c.offset, c.offset + c.num_tokens)
            if blocks is None:
                kc, vc = k[rows], v[rows]
            else:
                kc = k_cache.index_select(0, blocks).flatten(0, 1)[:c.context_len]  # [Tk, Hkv, D]
                vc = v_cache.index_select(0, blocks).flatten(0, 1)[:c.context_len]
            return rows, causal_attention(q[rows], kc, vc, scale)

        def decode(bucket: _DecodeBucket):
            return bucket.rows, bucket.attend(q, k_cache, v_cache, scale)

        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # contiguous, as the kernel writes it
        q = q.contiguous()
        # the kernel's threads: torch's, or one per share where workers run the shares
        threads = 1 if self.workers else self.cache.kernel_threads or torch.get_num_threads()

        def kernel(batch: DecodeBatch):
            batch.attend(q, k_cache, v_cache, scale, out, threads)  # writes its rows of out

        # cost ~ keys read per query, summed: how long the call takes, for sharing among workers
        calls = [(c.num_tokens * c.context_len, partial(prefill, c, blocks)) for c, blocks in self.prefills]
        calls += [(len(b.rows) * b.width, partial(decode, b)) for b in self.decode_buckets]
        calls += [(b.cost, partial(kernel, b)) for b in self.decode_batches]
        results = self.workers.run(calls) if self.workers else [call() for _, call in calls]
        for result in results:  # rows are disjoint
            if result is not None:
                rows, part = result
                out[rows] = part
        return out


class _DecodeBucket:
    """Decode queries that attend in one padded call: their block tables padded to the longest
    (with block 0) and an additive mask hiding the padding, built once per step for every layer."""

    def __init__(self, decodes: list[StepChunk], block_size: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu"):
        self.rows = torch.tensor([c.offset for c in decodes], dtype=torch.long, device=device)
        width = max(_num_blocks(c.context_len, block_size) for c in decodes)
        self.width = width * block_size  # L: keys each query reads, padding included
        table = []  # [B * N], each row padded with block 0
        for c in decodes:
            n = _num_blocks(c.context_len, block_size)
            table += c.blocks[:n]
            table += [0] * (width - n)
        self.blocks = torch.tensor(table, dtype=torch.long, device=device)
        lens = torch.tensor([c.context_len for c in decodes], device=device)
        visible = torch.arange(width * block_size, device=device)[None, :] < lens[:, None]  # [B, L]
        self.mask = torch.zeros(visible.shape, dtype=dtype).masked_fill_(~visible, float("-inf"))[:, None, None, :]

    def attend(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, scale: float) -> torch.Tensor:
        b, hq, d = len(self.rows), q.shape[1], q.shape[2]
        hkv = k_cache.shape[2]
        k = k_cache.index_select(0, self.blocks).view(b, -1, hkv, d).transpose(1, 2)  # [B, Hkv, L, D]
        v = v_cache.index_select(0, self.blocks).view(b, -1, hkv, d).transpose(1, 2)
        # query head h reads KV head h // (Hq / Hkv): each KV head's query heads are its queries
        qd = q.index_select(0, self.rows).view(b, hkv, hq // hkv, d)
        out = F.scaled_dot_product_attention(qd, k, v, attn_mask=self.mask, scale=scale)  # [B, Hkv, Hq/Hkv, D]
        return out.reshape(b, hq, d)


MAX_DECODE_BUCKETS = 4
MIN_DECODE_BUCKET = 16  # fewer sequences than this share one call (a call has a fixed cost)


def _split(decodes: list[StepChunk]) -> list[list[StepChunk]]:
    """Length-sorted decodes in up to MAX_DECODE_BUCKETS runs of equal size."""
    if not decodes:
        return []
    n = max(1, min(MAX_DECODE_BUCKETS, len(decodes) // MIN_DECODE_BUCKET))
    bounds = [round(i * len(decodes) / n) for i in range(n + 1)]
    return [decodes[a:b] for a, b in zip(bounds, bounds[1:])]


def _num_blocks(num_positions: int, block_size: int) -> int:
    return -(-num_positions // block_size)
