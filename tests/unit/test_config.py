import json

import pytest

from glm_ray.config import ConfigError, config_from_dict, load_model_config
from glm_ray.model.synthetic import preset_config


def glm46_like(**changes):
    cfg = preset_config("tiny")
    cfg.update(changes)
    return cfg


def write(tmp_path, cfg, generation=None):
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    if generation is not None:
        (tmp_path / "generation_config.json").write_text(json.dumps(generation))
    return tmp_path


def test_reads_glm46_values_and_derives_sizes(tmp_path):
    c = load_model_config(write(tmp_path, glm46_like(eos_token_id=[1, 2, 3])))
    assert c.rope_theta == 1e6 and c.partial_rotary_factor == 0.5
    assert c.rotary_dim == 8 and c.q_size == 64 and c.kv_size == 32
    assert c.moe_layers == [1, 2, 3] and not c.is_moe_layer(0)
    assert c.eos_token_ids == (1, 2, 3)
    assert c.use_qk_norm and c.attention_bias and c.routed_scaling_factor == 2.5


def test_rope_parameters_form_equals_top_level_form():
    top = glm46_like(rope_theta=500000.0, partial_rotary_factor=0.25)
    v5 = glm46_like()
    del v5["rope_theta"], v5["partial_rotary_factor"]
    v5["rope_parameters"] = {"rope_type": "default", "rope_theta": 500000.0, "partial_rotary_factor": 0.25}
    assert config_from_dict(top) == config_from_dict(v5)


def test_defaults_follow_transformers_where_keys_are_omitted():
    cfg = glm46_like()
    for key in ("rope_theta", "partial_rotary_factor", "use_qk_norm", "attention_bias", "n_group",
                "routed_scaling_factor", "head_dim"):
        del cfg[key]
    c = config_from_dict(cfg)
    assert c.rope_theta == 10000.0 and c.partial_rotary_factor == 0.5
    assert not c.use_qk_norm and not c.attention_bias
    assert c.n_group == 1 and c.routed_scaling_factor == 1.0
    assert c.head_dim == cfg["hidden_size"] // cfg["num_attention_heads"]


def test_generation_config_eos_overrides_config(tmp_path):
    c = load_model_config(write(tmp_path, glm46_like(eos_token_id=5), {"eos_token_id": [7, 8, 9]}))
    assert c.eos_token_ids == (7, 8, 9)


@pytest.mark.parametrize("changes, key", [
    ({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}, "architectures"),
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
    ({"num_experts_per_tok": 9}, "num_experts_per_tok"),
    ({"n_group": 4, "topk_group": 5}, "topk_group"),
    ({"n_group": 3}, "n_group"),
    ({"n_group": 4, "topk_group": 1, "num_experts_per_tok": 4}, "num_experts_per_tok"),
    ({"first_k_dense_replace": 9}, "first_k_dense_replace"),
    ({"hidden_size": "64"}, "hidden_size"),
    ({"use_qk_norm": "yes"}, "use_qk_norm"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"num_hidden_layers": 0}, "num_hidden_layers"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling"),
    ({"partial_rotary_factor": 1.5}, "partial_rotary_factor"),
])
def test_bad_values_name_the_key_and_the_file(tmp_path, changes, key):
    with pytest.raises(ConfigError) as e:
        load_model_config(write(tmp_path, glm46_like(**changes)))
    assert f"'{key}'" in str(e.value) and str(tmp_path / "config.json") in str(e.value)


@pytest.mark.parametrize("key", ["hidden_size", "n_routed_experts", "num_experts_per_tok", "vocab_size"])
def test_missing_required_key(tmp_path, key):
    cfg = glm46_like()
    del cfg[key]
    with pytest.raises(ConfigError, match=f"'{key}' is required"):
        load_model_config(write(tmp_path, cfg))


def test_missing_or_invalid_file(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        load_model_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_model_config(tmp_path)


def test_config_is_frozen():
    c = config_from_dict(glm46_like())
    with pytest.raises(AttributeError):
        c.hidden_size = 1
