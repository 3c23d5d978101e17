"""The one door from model code to routed experts (design.md, "The hot path").

Implementations: `LocalExperts` (in-process), and later a gRPC client to expert-group deployments.
Legend: T tokens, H hidden, K top-k.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch


class ExpertBackend(ABC):
    @abstractmethod
    def forward(
        self, layer: int, hidden_states: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
    ) -> torch.Tensor:
        """hidden_states [T, H], topk_ids [T, K] (global expert ids), topk_weights [T, K] fp32
        -> [T, H]: sum_k topk_weights[t, k] * Expert_{topk_ids[t, k]}(hidden_states[t])."""
