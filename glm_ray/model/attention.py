"""GQA self-attention with q/k/v bias, optional per-head q/k RMSNorm and partial RoPE (glm-spec §3.2).

The module projects, normalises and rotates; *where* keys and values live is the business of an
`AttentionBackend` passed in at call time (a contiguous reference cache, or the engine's paged cache).
Legend: T tokens in the step, D head_dim.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from glm_ray.config import ModelConfig
from glm_ray.model.layers import Linear, RMSNorm, RotaryEmbedding


class AttentionBackend(Protocol):
    """Stores this step's k/v and attends each query to its own sequence's keys, causally."""

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """q: [T, Hq, D], k/v: [T, Hkv, D] for the step's tokens -> [T, Hq, D]."""
        ...


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """One sequence: q [Tq, Hq, D] are the last Tq positions of k/v [Tk, Hkv, D] -> [Tq, Hq, D].

    On CPU, the arithmetic of torch's `scaled_dot_product_attention` on these 3-D views with a
    causal mask (its unfused math path) bit for bit, without that path's passes for rows that see
    no key (a causal row sees its own): prefill steps ~1.1x faster. The fused CPU kernel (4-D
    inputs) would be faster again, but it sums in another order: with it 254 of 256 greedy outputs
    of `glm-ray bench --workload B` matched transformers', against 256 (BENCHMARKS.md).
    """
    tq, tk = q.shape[0], k.shape[0]
    future = None  # [Tq, Tk]: the keys after each query's position
    if tq > 1:
        # query i sits at absolute position tk - tq + i and sees keys up to it
        rows = torch.arange(tq, device=q.device)[:, None] + (tk - tq)
        future = torch.arange(tk, device=q.device)[None, :] > rows
    if q.device.type != "cpu":  # other devices: their fused kernels
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=None if future is None else ~future,
            scale=scale, enable_gqa=q.shape[1] != k.shape[1],
        )
        return out.transpose(0, 1)
    dtype = q.dtype
    if dtype in (torch.float16, torch.bfloat16):  # the math path computes these in fp32
        q, k, v = q.float(), k.float(), v.float()
    group = q.shape[1] // k.shape[1]
    root = math.sqrt(scale)  # it scales q and k by sqrt(scale) each and repeats K/V heads for GQA
    keys = k.transpose(0, 1) * root  # [Hkv, Tk, D]
    values = v.transpose(0, 1)
    if group > 1:
        keys, values = keys.repeat_interleave(group, 0), values.repeat_interleave(group, 0)  # [Hq, Tk, D]
    scores = torch.matmul(q.transpose(0, 1) * root, keys.transpose(-2, -1))  # [Hq, Tq, Tk]
    if future is not None:
        scores.add_(torch.zeros(future.shape, dtype=scores.dtype).masked_fill_(future, float("-inf")))
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, values).to(dtype).transpose(0, 1)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_size, self.kv_size = config.q_size, config.kv_size
        self.scale = self.head_dim**-0.5
        self.qkv_proj = Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.attention_bias)
        self.o_proj = Linear(self.q_size, config.hidden_size, bias=False)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if config.use_qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if config.use_qk_norm else None

    def forward(
        self,
        hidden_states: torch.Tensor,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        rotary: RotaryEmbedding,
        backend: AttentionBackend,
    ) -> torch.Tensor:
        t = hidden_states.shape[0]
        q, k, v = self.qkv_proj(hidden_states).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:  # per head, after bias, before RoPE
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = cos_sin
        q, k = rotary(q, cos, sin), rotary(k, cos, sin)
        out = backend.attend(self.layer, q, k, v, self.scale)  # [T, Hq, D]
        return self.o_proj(out.reshape(t, self.q_size))
