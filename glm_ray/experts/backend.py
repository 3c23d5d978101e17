"""The one door from model code to routed experts (design.md, "The hot path").

Implementations: `LocalExperts` (in-process) and `RemoteExperts` (gRPC to expert-group
deployments). `submit` lets a backend put work in flight so the caller can compute the shared
expert meanwhile; `result()` then waits for it. Legend: T tokens, H hidden, K top-k.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Protocol

import torch


class PendingExperts(Protocol):
    def result(self) -> torch.Tensor: ...


class Done:
    """A result that is already there."""

    def __init__(self, value: torch.Tensor):
        self.value = value

    def result(self) -> torch.Tensor:
        return self.value


class ExpertBackend(ABC):
    @abstractmethod
    def forward(
        self, layer: int, hidden_states: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
    ) -> torch.Tensor:
        """hidden_states [T, H], topk_ids [T, K] (global expert ids), topk_weights [T, K] fp32
        -> [T, H] in hidden_states' dtype: sum_k topk_weights[t, k] * Expert_{topk_ids[t, k]}(hidden_states[t])."""

    def begin_step(self) -> None:
        """A new engine step starts (its MoE layers follow): a backend may switch tables here."""

    def submit(
        self, layer: int, hidden_states: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
    ) -> PendingExperts:
        """Start `forward`; the default computes it now."""
        return Done(self.forward(layer, hidden_states, topk_ids, topk_weights))
