"""Model configuration read from a checkpoint's `config.json` (glm-spec §1).

`ModelConfig` is frozen: everything derived (rotary width, which layers are MoE, EOS ids from
`generation_config.json`) is computed once in `load_model_config`, never patched in later.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUPPORTED_ARCHITECTURES = ("Glm4MoeForCausalLM",)
SUPPORTED_MODEL_TYPES = ("glm4_moe",)

# Keys without which a checkpoint cannot be sized: no default would be honest.
REQUIRED_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "moe_intermediate_size",
    "n_routed_experts",
    "num_experts_per_tok",
)

# Defaults where the file omits a key: transformers' `Glm4MoeConfig` (glm-spec §1.2).
DEFAULTS: dict[str, Any] = {
    "num_key_value_heads": 8,
    "head_dim": None,  # hidden_size // num_attention_heads
    "hidden_act": "silu",
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
    "rope_theta": 10000.0,
    "partial_rotary_factor": 0.5,
    "attention_bias": False,
    "n_shared_experts": 1,
    "routed_scaling_factor": 1.0,
    "n_group": 1,
    "topk_group": 1,
    "first_k_dense_replace": 1,
    "norm_topk_prob": True,
    "use_qk_norm": False,
    "num_nextn_predict_layers": 0,
    "pad_token_id": None,
    "bos_token_id": None,
    "torch_dtype": "bfloat16",
}


class ConfigError(ValueError):
    """A checkpoint config that cannot be served; the message names the key and the file."""


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    tie_word_embeddings: bool
    rope_theta: float
    partial_rotary_factor: float
    attention_bias: bool
    use_qk_norm: bool
    moe_intermediate_size: int
    n_routed_experts: int
    n_shared_experts: int
    num_experts_per_tok: int
    routed_scaling_factor: float
    n_group: int
    topk_group: int
    first_k_dense_replace: int
    norm_topk_prob: bool
    num_nextn_predict_layers: int
    torch_dtype: str
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    source: str = field(default="<dict>", compare=False)

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def is_moe_layer(self, layer: int) -> bool:
        return self.first_k_dense_replace <= layer < self.num_hidden_layers

    @property
    def moe_layers(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if self.is_moe_layer(i)]

    @property
    def mtp_layers(self) -> list[int]:
        n = self.num_hidden_layers
        return list(range(n, n + self.num_nextn_predict_layers))


def _fail(source: str, key: str, why: str) -> ConfigError:
    return ConfigError(f"{source}: key '{key}' {why}")


def _rope_fields(raw: dict, source: str) -> dict:
    """Accept both the top-level form and transformers-v5 `rope_parameters`."""
    out = {}
    params = raw.get("rope_parameters")
    if params is not None and not isinstance(params, dict):
        raise _fail(source, "rope_parameters", f"must be an object, got {params!r}")
    params = params or {}
    scaling = raw.get("rope_scaling")
    for name, blob in (("rope_parameters", params), ("rope_scaling", scaling or {})):
        rope_type = blob.get("rope_type", blob.get("type", "default"))
        if rope_type != "default":
            raise _fail(source, name, f"has rope_type {rope_type!r}; only 'default' RoPE is supported")
    for key in ("rope_theta", "partial_rotary_factor"):
        if key in params:
            out[key] = params[key]
        elif key in raw:
            out[key] = raw[key]
    return out


def _check_type(source: str, key: str, value: Any, kind: type) -> Any:
    if value is None and DEFAULTS.get(key, 0) is None:
        return value
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise _fail(source, key, f"must be an integer, got {value!r}")
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise _fail(source, key, f"must be a finite number, got {value!r}")
        return float(value)
    if kind is bool and not isinstance(value, bool):
        raise _fail(source, key, f"must be true or false, got {value!r}")
    if kind is str and not isinstance(value, str):
        raise _fail(source, key, f"must be a string, got {value!r}")
    return value


def _eos_ids(value: Any, source: str, key: str) -> tuple[int, ...]:
    if value is None:
        return ()
    ids = value if isinstance(value, list) else [value]
    for i in ids:
        if isinstance(i, bool) or not isinstance(i, int):
            raise _fail(source, key, f"must be an integer or a list of integers, got {value!r}")
    return tuple(ids)


def config_from_dict(raw: dict, source: str = "<dict>", generation: dict | None = None) -> ModelConfig:
    """Validate a parsed `config.json` (and optional `generation_config.json`) into a ModelConfig."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a JSON object, got {type(raw).__name__}")
    archs = raw.get("architectures")
    model_type = raw.get("model_type")
    if archs is not None and not any(a in SUPPORTED_ARCHITECTURES for a in archs):
        raise _fail(source, "architectures", f"is {archs!r}; glm-ray serves {list(SUPPORTED_ARCHITECTURES)}")
    if model_type is not None and model_type not in SUPPORTED_MODEL_TYPES:
        raise _fail(source, "model_type", f"is {model_type!r}; glm-ray serves {list(SUPPORTED_MODEL_TYPES)}")
    if archs is None and model_type is None:
        raise _fail(source, "architectures", "is missing (and so is model_type): cannot tell this is a GLM-4 MoE checkpoint")
    for key in REQUIRED_KEYS:
        if key not in raw:
            raise _fail(source, key, "is required but missing")

    v = {**DEFAULTS, **{k: raw[k] for k in raw if k in DEFAULTS or k in REQUIRED_KEYS}}
    v.update(_rope_fields(raw, source))
    if "dtype" in raw and "torch_dtype" not in raw:  # transformers v5 writes `dtype`
        v["torch_dtype"] = raw["dtype"]

    ints = [*REQUIRED_KEYS, "num_key_value_heads", "max_position_embeddings", "n_shared_experts", "n_group",
            "topk_group", "first_k_dense_replace", "num_nextn_predict_layers"]
    for key in ints:
        v[key] = _check_type(source, key, v[key], int)
    for key in ("rms_norm_eps", "rope_theta", "partial_rotary_factor", "routed_scaling_factor"):
        v[key] = _check_type(source, key, v[key], float)
    for key in ("tie_word_embeddings", "attention_bias", "use_qk_norm", "norm_topk_prob"):
        v[key] = _check_type(source, key, v[key], bool)
    for key in ("hidden_act", "torch_dtype"):
        v[key] = _check_type(source, key, v[key], str)
    for key in ("pad_token_id", "bos_token_id"):
        if v[key] is not None:
            v[key] = _check_type(source, key, v[key], int)
    if v["head_dim"] is None:
        v["head_dim"] = v["hidden_size"] // max(v["num_attention_heads"], 1)
    v["head_dim"] = _check_type(source, "head_dim", v["head_dim"], int)

    for key in [*REQUIRED_KEYS, "num_key_value_heads", "head_dim", "max_position_embeddings", "n_group", "topk_group"]:
        if v[key] <= 0:
            raise _fail(source, key, f"must be positive, got {v[key]}")
    for key in ("n_shared_experts", "first_k_dense_replace", "num_nextn_predict_layers"):
        if v[key] < 0:
            raise _fail(source, key, f"must be >= 0, got {v[key]}")
    if v["hidden_act"] != "silu":
        raise _fail(source, "hidden_act", f"is {v['hidden_act']!r}; GLM-4 MoE uses 'silu'")
    if v["torch_dtype"] not in ("bfloat16", "float32", "float16"):
        raise _fail(source, "torch_dtype", f"is {v['torch_dtype']!r}; expected bfloat16, float16 or float32")
    if v["num_attention_heads"] % v["num_key_value_heads"]:
        raise _fail(source, "num_key_value_heads",
                    f"({v['num_key_value_heads']}) must divide num_attention_heads ({v['num_attention_heads']})")
    if v["num_experts_per_tok"] > v["n_routed_experts"]:
        raise _fail(source, "num_experts_per_tok",
                    f"({v['num_experts_per_tok']}) exceeds n_routed_experts ({v['n_routed_experts']})")
    if v["n_routed_experts"] % v["n_group"]:
        raise _fail(source, "n_group", f"({v['n_group']}) must divide n_routed_experts ({v['n_routed_experts']})")
    if v["topk_group"] > v["n_group"]:
        raise _fail(source, "topk_group", f"({v['topk_group']}) exceeds n_group ({v['n_group']})")
    per_group = v["n_routed_experts"] // v["n_group"]
    if v["n_group"] > 1 and per_group < 2:
        raise _fail(source, "n_group", f"({v['n_group']}) leaves {per_group} expert per group; group scores need 2")
    if v["num_experts_per_tok"] > v["topk_group"] * per_group:
        raise _fail(source, "num_experts_per_tok",
                    f"({v['num_experts_per_tok']}) exceeds the experts in topk_group={v['topk_group']} groups "
                    f"({v['topk_group'] * per_group})")
    if v["first_k_dense_replace"] > v["num_hidden_layers"]:
        raise _fail(source, "first_k_dense_replace",
                    f"({v['first_k_dense_replace']}) exceeds num_hidden_layers ({v['num_hidden_layers']})")
    if not 0.0 < v["partial_rotary_factor"] <= 1.0:
        raise _fail(source, "partial_rotary_factor", f"must be in (0, 1], got {v['partial_rotary_factor']}")
    rotary = int(v["head_dim"] * v["partial_rotary_factor"])
    if rotary % 2 or rotary == 0:
        raise _fail(source, "partial_rotary_factor",
                    f"gives an odd or empty rotary width {rotary} for head_dim {v['head_dim']}")
    if v["rope_theta"] <= 0 or v["rms_norm_eps"] <= 0:
        raise _fail(source, "rope_theta" if v["rope_theta"] <= 0 else "rms_norm_eps", "must be positive")

    eos = _eos_ids(raw.get("eos_token_id"), source, "eos_token_id")
    if generation and "eos_token_id" in generation:
        eos = _eos_ids(generation["eos_token_id"], f"{source} (generation_config.json)", "eos_token_id")
    names = {f for f in ModelConfig.__dataclass_fields__} - {"eos_token_ids", "source"}
    return ModelConfig(**{k: v[k] for k in names}, eos_token_ids=eos, source=source)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None


def load_model_config(model_dir: str | Path) -> ModelConfig:
    """Read `config.json` (plus `generation_config.json` when present) from a checkpoint directory."""
    model_dir = Path(model_dir)
    path = model_dir / "config.json"
    if not path.is_file():
        raise ConfigError(f"{path}: no config.json in the model directory {model_dir}")
    gen_path = model_dir / "generation_config.json"
    generation = _read_json(gen_path) if gen_path.is_file() else None
    return config_from_dict(_read_json(path), source=str(path), generation=generation)
