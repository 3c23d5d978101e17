"""GLM-4 MoE decoder (`Glm4MoeForCausalLM`), in dependency order: layer, model (glm-spec §3).

Tokens of a step arrive flat ([T], several sequences concatenated); the attention backend knows
which token belongs to which sequence. Routed experts are reached only through `ExpertBackend`.
Legend: T tokens, H hidden, V vocab.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from glm_ray.config import ModelConfig
from glm_ray.experts.backend import Done, ExpertBackend
from glm_ray.model.attention import Attention, AttentionBackend
from glm_ray.model.layers import RMSNorm, RotaryEmbedding, SwiGLU
from glm_ray.model.moe import MoE


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.is_moe = config.is_moe_layer(layer)
        self.mlp = MoE(config, layer) if self.is_moe else SwiGLU(config.hidden_size, config.intermediate_size)

    def forward(self, hidden_states, cos_sin, rotary, attn: AttentionBackend, experts: ExpertBackend):
        hidden_states, pending = self.begin(hidden_states, cos_sin, rotary, attn, experts)
        return hidden_states + pending.result()

    def begin(self, hidden_states, cos_sin, rotary, attn: AttentionBackend, experts: ExpertBackend):
        """Attention, then the MLP put in flight: (residual stream, pending MLP output)."""
        hidden_states = hidden_states + self.self_attn(self.input_layernorm(hidden_states), cos_sin, rotary, attn)
        x = self.post_attention_layernorm(hidden_states)
        return hidden_states, (self.mlp.begin(x, experts) if self.is_moe else Done(self.mlp(x)))


class Glm4MoeModel(nn.Module):
    """Embeddings, decoder layers, final norm and LM head. Holds no routed expert."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size,
                                                                           bias=False)
        self.rotary = RotaryEmbedding(config.rotary_dim, config.rope_theta)
        self.requires_grad_(False)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionBackend, experts: ExpertBackend
    ) -> torch.Tensor:
        """input_ids, positions [T] -> final-normed hidden states [T, H]."""
        hidden_states = self.embed_tokens(input_ids)
        cos_sin = self.rotary.cos_sin(positions, hidden_states.dtype)
        for layer in self.layers:
            hidden_states = layer(hidden_states, cos_sin, self.rotary, attn, experts)
        return self.norm(hidden_states)

    def forward_interleaved(self, batches: list[tuple[torch.Tensor, torch.Tensor, AttentionBackend]],
                            experts: ExpertBackend) -> list[torch.Tensor]:
        """`forward` of several micro-batches [(input_ids, positions, attn)], layer by layer in turn,
        so one micro-batch's routed experts are in flight (remote backends) while the next one's
        attention runs. Each result equals `forward` of that micro-batch alone."""
        states = []
        for input_ids, positions, attn in batches:
            hidden_states = self.embed_tokens(input_ids)
            states.append([hidden_states, self.rotary.cos_sin(positions, hidden_states.dtype), attn, None])
        for layer in self.layers:
            for state in states:
                hidden_states, cos_sin, attn, pending = state
                if pending is not None:  # this micro-batch's previous layer: its MLP output is due
                    hidden_states = hidden_states + pending.result()
                state[0], state[3] = layer.begin(hidden_states, cos_sin, self.rotary, attn, experts)
        return [self.norm(hidden_states + pending.result()) for hidden_states, _, _, pending in states]

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[T, H] -> fp32 logits [T, V]."""
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(hidden_states, weight).float()
