"""Checkpoint tensor names -> the internal layout, in one table (glm-spec §2).

Checkpoints store q/k/v and gate/up separately and every routed expert under its own name; inside,
q/k/v are one `qkv_proj`, gate/up one `gate_up_proj`, and routed experts are stacked per layer
(`w13` [E, 2I, H], `w2` [E, H, I]) for the expert backend.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

from glm_ray.config import ModelConfig


@dataclass(frozen=True)
class Target:
    """Where one checkpoint tensor goes.

    kind: "dense" (a model parameter), "expert" (a routed-expert stack) or "mtp" (kept out).
    name: the internal parameter name, or "w13"/"w2" for experts.
    part: which row block of a fused tensor ("q", "k", "v", "gate", "up") or None for the whole.
    """

    kind: str
    name: str
    layer: int | None = None
    expert: int | None = None
    part: str | None = None


_L = r"model\.layers\.(?P<layer>\d+)\."
# (checkpoint pattern, internal name template, fused part). Order matters: experts before dense mlp.
TABLE: list[tuple[re.Pattern, str, str | None]] = [
    (re.compile(r"model\.embed_tokens\.weight"), "embed_tokens.weight", None),
    (re.compile(r"model\.norm\.weight"), "norm.weight", None),
    (re.compile(r"lm_head\.weight"), "lm_head.weight", None),
    (re.compile(_L + r"input_layernorm\.weight"), "layers.{layer}.input_layernorm.weight", None),
    (re.compile(_L + r"post_attention_layernorm\.weight"), "layers.{layer}.post_attention_layernorm.weight", None),
    (re.compile(_L + r"self_attn\.(?P<p>[qkv])_proj\.(?P<t>weight|bias)"), "layers.{layer}.self_attn.qkv_proj.{t}", "{p}"),
    (re.compile(_L + r"self_attn\.o_proj\.weight"), "layers.{layer}.self_attn.o_proj.weight", None),
    (re.compile(_L + r"self_attn\.(?P<n>[qk])_norm\.weight"), "layers.{layer}.self_attn.{n}_norm.weight", None),
    (re.compile(_L + r"mlp\.experts\.(?P<expert>\d+)\.(?P<p>gate|up)_proj\.weight"), "w13", "{p}"),
    (re.compile(_L + r"mlp\.experts\.(?P<expert>\d+)\.down_proj\.weight"), "w2", None),
    (re.compile(_L + r"mlp\.gate\.weight"), "layers.{layer}.mlp.gate.weight", None),
    (re.compile(_L + r"mlp\.gate\.e_score_correction_bias"), "layers.{layer}.mlp.gate.e_score_correction_bias", None),
    (re.compile(_L + r"mlp\.shared_experts\.(?P<p>gate|up)_proj\.weight"),
     "layers.{layer}.mlp.shared_experts.gate_up_proj.weight", "{p}"),
    (re.compile(_L + r"mlp\.shared_experts\.down_proj\.weight"), "layers.{layer}.mlp.shared_experts.down_proj.weight", None),
    (re.compile(_L + r"mlp\.(?P<p>gate|up)_proj\.weight"), "layers.{layer}.mlp.gate_up_proj.weight", "{p}"),
    (re.compile(_L + r"mlp\.down_proj\.weight"), "layers.{layer}.mlp.down_proj.weight", None),
]

_ANY_LAYER = re.compile(_L)


def map_name(name: str, config: ModelConfig) -> Target | None:
    """The target of a checkpoint tensor, or None if it belongs nowhere (an unexpected tensor)."""
    m = _ANY_LAYER.match(name)
    if m:
        layer = int(m.group("layer"))
        if layer in config.mtp_layers:
            return Target("mtp", name, layer)
        if layer >= config.num_hidden_layers:
            return None
    for pattern, template, part in TABLE:
        m = pattern.fullmatch(name)
        if not m:
            continue
        g = m.groupdict()
        layer = int(g["layer"]) if "layer" in g else None
        if "expert" in g:
            expert = int(g["expert"])
            if not config.is_moe_layer(layer) or expert >= config.n_routed_experts:
                return None
            return Target("expert", template, layer, expert, part.format(**g) if part else None)
        target = Target("dense", template.format(**g), layer, None, part.format(**g) if part else None)
        return target if target.name in expected_dense_shapes(config) else None
    return None


@lru_cache(maxsize=8)
def expected_dense_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Internal dense parameter names and shapes (fused)."""
    c = config
    h = c.hidden_size
    shapes: dict[str, tuple[int, ...]] = {"embed_tokens.weight": (c.vocab_size, h), "norm.weight": (h,)}
    if not c.tie_word_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, h)
    for i in range(c.num_hidden_layers):
        p = f"layers.{i}."
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
        shapes[p + "self_attn.qkv_proj.weight"] = (c.q_size + 2 * c.kv_size, h)
        if c.attention_bias:
            shapes[p + "self_attn.qkv_proj.bias"] = (c.q_size + 2 * c.kv_size,)
        shapes[p + "self_attn.o_proj.weight"] = (h, c.q_size)
        if c.use_qk_norm:
            shapes[p + "self_attn.q_norm.weight"] = (c.head_dim,)
            shapes[p + "self_attn.k_norm.weight"] = (c.head_dim,)
        if c.is_moe_layer(i):
            shapes[p + "mlp.gate.weight"] = (c.n_routed_experts, h)
            shapes[p + "mlp.gate.e_score_correction_bias"] = (c.n_routed_experts,)
            if c.n_shared_experts:
                width = c.moe_intermediate_size * c.n_shared_experts
                shapes[p + "mlp.shared_experts.gate_up_proj.weight"] = (2 * width, h)
                shapes[p + "mlp.shared_experts.down_proj.weight"] = (h, width)
        else:
            shapes[p + "mlp.gate_up_proj.weight"] = (2 * c.intermediate_size, h)
            shapes[p + "mlp.down_proj.weight"] = (h, c.intermediate_size)
    return shapes


def part_rows(fused_rows: int, part: str | None, config: ModelConfig) -> tuple[int, int]:
    """Row range [start, stop) of a fused tensor that one checkpoint part fills."""
    if part is None:
        return 0, fused_rows
    if part in ("q", "k", "v"):
        q, kv = config.q_size, config.kv_size
        return {"q": (0, q), "k": (q, q + kv), "v": (q + kv, q + 2 * kv)}[part]
    half = fused_rows // 2
    return (0, half) if part == "gate" else (half, fused_rows)


def checkpoint_shape(target: Target, config: ModelConfig) -> tuple[int, ...]:
    """The shape the checkpoint tensor must have."""
    h, i = config.hidden_size, config.moe_intermediate_size
    if target.kind == "expert":
        return (i, h) if target.name == "w13" else (h, i)
    fused = expected_dense_shapes(config)[target.name]
    start, stop = part_rows(fused[0], target.part, config)
    return (stop - start, *fused[1:])


def expected_checkpoint_names(config: ModelConfig) -> list[str]:
    """Every tensor a complete main-model checkpoint must hold (MTP tensors are optional)."""
    c = config
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    if not c.tie_word_embeddings:
        names.append("lm_head.weight")
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        names += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight", p + "self_attn.o_proj.weight"]
        names += [p + f"self_attn.{x}_proj.weight" for x in "qkv"]
        if c.attention_bias:
            names += [p + f"self_attn.{x}_proj.bias" for x in "qkv"]
        if c.use_qk_norm:
            names += [p + "self_attn.q_norm.weight", p + "self_attn.k_norm.weight"]
        if c.is_moe_layer(i):
            names += [p + "mlp.gate.weight", p + "mlp.gate.e_score_correction_bias"]
            if c.n_shared_experts:
                names += [p + f"mlp.shared_experts.{x}_proj.weight" for x in ("gate", "up", "down")]
            for e in range(c.n_routed_experts):
                names += [p + f"mlp.experts.{e}.{x}_proj.weight" for x in ("gate", "up", "down")]
        else:
            names += [p + f"mlp.{x}_proj.weight" for x in ("gate", "up", "down")]
    return names
