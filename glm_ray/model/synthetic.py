"""Deterministic GLM-4 MoE checkpoints built locally (`glm-ray make-model`).

The directory is HF format: config.json, generation_config.json, safetensors (single or sharded
with an index), tokenizer.json and tokenizer_config.json with the chat template, so
`transformers.AutoModelForCausalLM.from_pretrained(dir)` loads it unchanged.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from glm_ray.config import config_from_dict
from glm_ray.model.names import checkpoint_shape, expected_checkpoint_names, map_name

_GLM46 = dict(
    architectures=["Glm4MoeForCausalLM"], model_type="glm4_moe", hidden_act="silu", attention_bias=True,
    partial_rotary_factor=0.5, rope_theta=1000000.0, max_position_embeddings=202752, rms_norm_eps=1e-5,
    n_shared_experts=1, routed_scaling_factor=2.5, n_group=1, topk_group=1, norm_topk_prob=True,
    use_qk_norm=True, tie_word_embeddings=False, num_nextn_predict_layers=0, initializer_range=0.02,
    attention_dropout=0.0, use_cache=True,
)

PRESETS: dict[str, dict] = {
    "tiny": dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                 first_k_dense_replace=1, n_routed_experts=8, num_experts_per_tok=4, moe_intermediate_size=32,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16),
    "small": dict(vocab_size=1024, hidden_size=512, intermediate_size=1024, num_hidden_layers=8,
                  first_k_dense_replace=1, n_routed_experts=32, num_experts_per_tok=4, moe_intermediate_size=256,
                  num_attention_heads=8, num_key_value_heads=2, head_dim=64),
}

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def preset_config(preset: str, overrides: dict | None = None) -> dict:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    return {**_GLM46, **PRESETS[preset], **(overrides or {})}


def _init(name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Scales chosen so activations stay O(1) and logits are well separated (no near-ties)."""
    if name.endswith("norm.weight"):
        return 1.0 + 0.1 * torch.randn(shape, generator=gen)
    if name.endswith(".bias") or name.endswith("e_score_correction_bias"):
        return 0.1 * torch.randn(shape, generator=gen)
    if name.endswith("embed_tokens.weight"):
        return torch.randn(shape, generator=gen)
    scale = 3.0 if name.endswith("head.weight") else 1.0
    return scale * torch.randn(shape, generator=gen) / math.sqrt(shape[-1])


def _mtp_tensors(cfg: dict, config, layout: str) -> dict[str, tuple[int, ...]]:
    """The MTP layer at index num_hidden_layers: a full MoE decoder block plus its own norms and
    projection (glm-spec §2). GLM-4.5 also stores its own embedding and head; GLM-4.6 does not."""
    n, h = config.num_hidden_layers, config.hidden_size
    block = dict(cfg, num_hidden_layers=n + 1, first_k_dense_replace=min(config.first_k_dense_replace, n))
    block_config = config_from_dict(block)
    p = f"model.layers.{n}."
    shapes = {name: checkpoint_shape(map_name(name, block_config), block_config)
              for name in expected_checkpoint_names(block_config) if name.startswith(p)}
    shapes.update({p + "enorm.weight": (h,), p + "hnorm.weight": (h,), p + "eh_proj.weight": (h, 2 * h),
                   p + "shared_head.norm.weight": (h,)})
    if layout == "glm-4.5":
        shapes[p + "embed_tokens.weight"] = (config.vocab_size, h)
        shapes[p + "shared_head.head.weight"] = (config.vocab_size, h)
    return shapes


def make_model(
    out_dir: str | Path,
    preset: str = "tiny",
    *,
    seed: int = 0,
    overrides: dict | None = None,
    dtype: str = "float32",
    shards: int = 1,
    mtp: str | None = None,
    rope_format: str = "top-level",
    hot_experts: dict[int, float] | None = None,
) -> Path:
    """Write a deterministic checkpoint directory; returns its path.

    overrides: config.json keys to change; mtp: None, "glm-4.6" or "glm-4.5" (MTP layer layout);
    rope_format: "top-level" (GLM's own files) or "rope_parameters" (transformers v5);
    hot_experts: {expert: bias} added to every MoE layer's e_score_correction_bias, a skewed
    routing (bias 1.0 beats every sigmoid score: the expert is always chosen) for load-balancing
    and autoscaling tests; the routing weights still come from the unbiased scores."""
    from glm_ray.tokenizer import write_tokenizer_files

    if dtype not in _DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(_DTYPES)}")
    if mtp not in (None, "glm-4.6", "glm-4.5"):
        raise ValueError(f"mtp {mtp!r} is not one of glm-4.6, glm-4.5")
    cfg = preset_config(preset, overrides)
    if mtp:
        cfg["num_nextn_predict_layers"] = 1
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".make-model-", dir=out_dir.parent))
    try:
        special = write_tokenizer_files(tmp, cfg["vocab_size"])
        eos = [special["<|endoftext|>"], special["<|user|>"], special["<|observation|>"]]
        cfg.update(eos_token_id=eos, pad_token_id=special["<|endoftext|>"], torch_dtype=dtype)
        config = config_from_dict(cfg, source=str(out_dir / "config.json"))

        gen = torch.Generator().manual_seed(seed)
        shapes = {n: checkpoint_shape(map_name(n, config), config) for n in expected_checkpoint_names(config)}
        if mtp:
            shapes.update(_mtp_tensors(cfg, config, mtp))
        tensors = {}
        for name, shape in shapes.items():
            t = _init(name, shape, gen)
            if name.endswith("e_score_correction_bias"):
                for expert, bias in (hot_experts or {}).items():
                    t[expert] += bias
                tensors[name] = t.float()
            else:
                tensors[name] = t.to(_DTYPES[dtype])
        _save(tensors, tmp, shards)

        written = dict(cfg)
        if rope_format == "rope_parameters":
            written["rope_parameters"] = {"rope_type": "default", "rope_theta": written.pop("rope_theta"),
                                          "partial_rotary_factor": written.pop("partial_rotary_factor")}
        (tmp / "config.json").write_text(json.dumps(written, indent=2, sort_keys=True) + "\n")
        generation = {"eos_token_id": eos, "pad_token_id": special["<|endoftext|>"], "temperature": 1.0,
                      "top_p": 0.95, "do_sample": True}
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)  # readers never see a half-written directory
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _save(tensors: dict[str, torch.Tensor], out: Path, shards: int) -> None:
    if shards <= 1:
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
        return
    names = list(tensors)
    per = math.ceil(len(names) / shards)
    weight_map = {}
    for k in range(shards):
        fname = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        chunk = {n: tensors[n] for n in names[k * per:(k + 1) * per]}
        save_file(chunk, str(out / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in chunk})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
