"""The MoE block: fp32 sigmoid router with group-limited top-k, routed experts behind an
`ExpertBackend`, plus the unscaled shared expert (glm-spec §3.4).

Legend: T tokens, H hidden, E routed experts, G groups, K top-k.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from glm_ray.config import ModelConfig
from glm_ray.experts.backend import ExpertBackend
from glm_ray.model.layers import SwiGLU


def route(
    router_logits: torch.Tensor,
    correction_bias: torch.Tensor,
    *,
    top_k: int,
    n_group: int,
    topk_group: int,
    norm_topk_prob: bool,
    routed_scaling_factor: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits [T, E] fp32 -> (topk_ids [T, K], topk_weights [T, K] fp32)."""
    t, e = router_logits.shape
    scores = router_logits.sigmoid()
    choice = scores + correction_bias  # the bias chooses experts, it never weights them
    if n_group > 1:
        group_scores = choice.view(t, n_group, e // n_group).topk(2, dim=-1)[0].sum(dim=-1)  # [T, G]
        keep = torch.zeros_like(group_scores, dtype=torch.bool)
        keep.scatter_(1, group_scores.topk(topk_group, dim=-1, sorted=False)[1], True)
        expert_keep = keep[:, :, None].expand(t, n_group, e // n_group).reshape(t, e)
        choice = choice.masked_fill(~expert_keep, float("-inf"))
    topk_ids = choice.topk(top_k, dim=-1, sorted=False)[1]
    weights = scores.gather(1, topk_ids)
    if norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return topk_ids, weights * routed_scaling_factor


class Gate(nn.Module):
    """Router weight and e_score_correction_bias, both kept in fp32 whatever the model dtype."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(config.n_routed_experts, config.hidden_size), requires_grad=False)
        self.e_score_correction_bias = nn.Parameter(torch.zeros(config.n_routed_experts), requires_grad=False)
        self.kwargs = dict(
            top_k=config.num_experts_per_tok, n_group=config.n_group, topk_group=config.topk_group,
            norm_topk_prob=config.norm_topk_prob, routed_scaling_factor=config.routed_scaling_factor,
        )

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = F.linear(hidden_states.float(), self.weight.float())  # [T, E]
        return route(logits, self.e_score_correction_bias.float(), **self.kwargs)


class MoE(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.gate = Gate(config)
        self.shared_experts = (
            SwiGLU(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts)
            if config.n_shared_experts else None
        )

    def forward(self, hidden_states: torch.Tensor, experts: ExpertBackend) -> torch.Tensor:
        return self.begin(hidden_states, experts).result()

    def begin(self, hidden_states: torch.Tensor, experts: ExpertBackend) -> PendingMoE:
        """Route and put the routed work in flight; `.result()` adds the shared expert and waits."""
        topk_ids, topk_weights = self.gate(hidden_states)
        return PendingMoE(self, hidden_states, experts.submit(self.layer, hidden_states, topk_ids, topk_weights))


class PendingMoE:
    def __init__(self, moe: MoE, hidden_states: torch.Tensor, routed):
        self.moe, self.hidden_states, self.routed = moe, hidden_states, routed

    def result(self) -> torch.Tensor:
        # the shared expert runs while routed work is in flight (remote backends)
        shared = self.moe.shared_experts(self.hidden_states) if self.moe.shared_experts is not None else None
        routed = self.routed.result()
        return routed if shared is None else routed + shared
