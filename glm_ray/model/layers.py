"""Small building blocks: RMSNorm, partial NeoX RoPE, SwiGLU MLP (glm-spec §3.1-3.3).

Legend for shape comments: T tokens, H hidden, I intermediate, D head_dim, R rotary width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """y = w * (x * rsqrt(mean(x^2) + eps)), the statistic in fp32, cast back before the weight."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class RotaryEmbedding(nn.Module):
    """Partial rotate-half RoPE: only the first `rotary_dim` dims of each head rotate."""

    def __init__(self, rotary_dim: int, theta: float):
        super().__init__()
        self.rotary_dim = rotary_dim
        inv_freq = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float) / rotary_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions[:, None].float() * self.inv_freq  # [T, R/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [T, R]
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x: [T, heads, D]; cos/sin: [T, R]."""
        r = self.rotary_dim
        x_rot, x_pass = x[..., :r], x[..., r:]
        half = r // 2
        rotated = torch.cat((-x_rot[..., half:], x_rot[..., :half]), dim=-1)
        x_rot = x_rot * cos[:, None, :] + rotated * sin[:, None, :]
        return torch.cat((x_rot, x_pass), dim=-1)


class Linear(nn.Linear):
    """nn.Linear whose rows (tokens) an engine may share among threads by setting `workers`
    (engine/attention_workers.py); every row comes out bit-identical either way."""

    workers = None  # an AttentionWorkers, or None: this thread alone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.workers is not None:
            return self.workers.linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)) with gate and up fused into one [2I, H] weight."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.intermediate_size = intermediate_size
        self.gate_up_proj = Linear(hidden_size, 2 * intermediate_size, bias=False)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # [T, I] each
        return self.down_proj(F.silu(gate) * up)
