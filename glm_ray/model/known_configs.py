"""The published `config.json` of GLM-4.5, GLM-4.5-Air and GLM-4.6, for sizing without a download.

Values are the project's GLM spec (glm-spec.md §1.1, "Configuration (`config.json`) / Values"),
column by column; the spec names its sources per column (tech report Table 1, transformers'
Glm4MoeConfig, published derivative config.json files). GLM-4.6 and GLM-4.5-Air are written as
GLM-4.5 plus every field that differs there. These are plain dicts, so they take the same
`config_from_dict` path as a real config.json.
"""

from __future__ import annotations

from glm_ray.config import ModelConfig, config_from_dict

# glm-spec.md §1.1, column "GLM-4.5" (92 layers = 3 dense + 89 MoE, 160 experts).
GLM_4_5: dict = {
    "architectures": ["Glm4MoeForCausalLM"],
    "model_type": "glm4_moe",
    "hidden_size": 5120,
    "num_hidden_layers": 92,
    "num_attention_heads": 96,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "partial_rotary_factor": 0.5,
    "rope_theta": 1000000,
    "rope_scaling": None,
    "max_position_embeddings": 131072,
    "intermediate_size": 12288,
    "moe_intermediate_size": 1536,
    "n_routed_experts": 160,
    "n_shared_experts": 1,
    "num_experts_per_tok": 8,
    "first_k_dense_replace": 3,
    "n_group": 1,
    "topk_group": 1,
    "norm_topk_prob": True,
    "routed_scaling_factor": 2.5,
    "use_qk_norm": True,
    "attention_bias": True,
    "num_nextn_predict_layers": 1,
    "vocab_size": 151552,
    "eos_token_id": [151329, 151336, 151338],
    "pad_token_id": 151329,
    "tie_word_embeddings": False,
    "rms_norm_eps": 1e-05,
    "hidden_act": "silu",
    "torch_dtype": "bfloat16",
    "attention_dropout": 0.0,
    "initializer_range": 0.02,
}

# glm-spec.md §1.1, column "GLM-4.6": GLM-4.5's shape with a 200K context.
GLM_4_6: dict = {**GLM_4_5, "max_position_embeddings": 202752}

# glm-spec.md §1.1, column "GLM-4.5-Air" (46 layers = 1 dense + 45 MoE, 128 experts, no QK-norm).
# eos_token_id: the chat-model list, as the spec's table gives it (see its note on the base model).
GLM_4_5_AIR: dict = {
    **GLM_4_5,
    "hidden_size": 4096,
    "num_hidden_layers": 46,
    "intermediate_size": 10944,
    "moe_intermediate_size": 1408,
    "n_routed_experts": 128,
    "first_k_dense_replace": 1,
    "routed_scaling_factor": 1.0,
    "use_qk_norm": False,
}

KNOWN_CONFIGS: dict[str, dict] = {"glm-4.5": GLM_4_5, "glm-4.5-air": GLM_4_5_AIR, "glm-4.6": GLM_4_6}


def known_config(name: str) -> ModelConfig:
    """The built-in config called `name` (case-insensitive), validated like a config.json."""
    key = name.lower()
    if key not in KNOWN_CONFIGS:
        raise KeyError(f"{name!r} is not a built-in model config; choose one of {', '.join(KNOWN_CONFIGS)}")
    return config_from_dict(dict(KNOWN_CONFIGS[key]), source=f"built-in {key} (glm-spec.md §1.1)")
