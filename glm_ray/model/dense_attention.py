"""The reference attention backend: one contiguous, growing KV tensor per sequence, no paging.

It defines what the paged engine must reproduce. A step carries several sequences' new tokens
concatenated; `seq_lens` says how many each contributes.
"""

from __future__ import annotations

import torch

from glm_ray.model.attention import causal_attention


class DenseKVCache:
    """Per-sequence, per-layer k/v tensors [S, Hkv, D], appended to step by step."""

    def __init__(self):
        self._kv: dict[object, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
        self.seq_ids: list = []
        self.seq_lens: list[int] = []

    def begin_step(self, seq_ids: list, seq_lens: list[int]) -> None:
        self.seq_ids, self.seq_lens = list(seq_ids), list(seq_lens)

    def num_cached(self, seq_id) -> int:
        layers = self._kv.get(seq_id)
        if not layers:
            return 0
        return next(iter(layers.values()))[0].shape[0]

    def free(self, seq_id) -> None:
        self._kv.pop(seq_id, None)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        outs = []
        for seq_id, qs, ks, vs in zip(self.seq_ids, q.split(self.seq_lens), k.split(self.seq_lens),
                                      v.split(self.seq_lens)):
            layers = self._kv.setdefault(seq_id, {})
            if layer in layers:
                old_k, old_v = layers[layer]
                ks, vs = torch.cat((old_k, ks)), torch.cat((old_v, vs))
            layers[layer] = (ks, vs)
            outs.append(causal_attention(qs, ks, vs, scale))
        return torch.cat(outs)
