import json

import pytest
import torch
from safetensors.torch import load_file

from glm_ray.config import load_model_config
from glm_ray.model.default import default_model_dir
from glm_ray.model.loader import load_weights
from glm_ray.model.synthetic import make_model
from glm_ray.tokenizer import Tokenizer


def test_same_seed_same_bytes_other_seed_other_weights(tmp_path):
    a = make_model(tmp_path / "a", "tiny", seed=1)
    b = make_model(tmp_path / "b", "tiny", seed=1)
    c = make_model(tmp_path / "c", "tiny", seed=2)
    for name in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()


def test_tiny_preset_shape_and_special_tokens(tiny_model_dir):
    c = load_model_config(tiny_model_dir)
    assert (c.vocab_size, c.hidden_size, c.num_hidden_layers, c.first_k_dense_replace) == (1024, 64, 4, 1)
    assert (c.n_routed_experts, c.num_experts_per_tok, c.n_shared_experts) == (8, 4, 1)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.use_qk_norm) == (4, 2, 16, True)
    tok = Tokenizer.from_pretrained(tiny_model_dir)
    ids = [tok.token_to_id(t) for t in ("<|endoftext|>", "<|user|>", "<|observation|>")]
    assert c.eos_token_ids == tuple(ids)
    for t in ("[gMASK]", "<sop>", "<|system|>", "<|assistant|>", "<think>", "</think>", "<tool_call>",
              "</tool_call>", "<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>"):
        assert tok.token_to_id(t) is not None and tok.encode(t) == [tok.token_to_id(t)]
    gen = json.loads((tiny_model_dir / "generation_config.json").read_text())
    assert gen["eos_token_id"] == ids
    raw = load_file(str(tiny_model_dir / "model.safetensors"))
    assert raw["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32


def test_small_preset_bf16(tmp_path):
    d = make_model(tmp_path / "small", "small", dtype="bfloat16")
    c = load_model_config(d)
    assert (c.hidden_size, c.num_hidden_layers, c.intermediate_size, c.n_routed_experts) == (512, 8, 1024, 32)
    assert (c.num_experts_per_tok, c.moe_intermediate_size, c.num_attention_heads, c.head_dim) == (4, 256, 8, 64)
    w = load_weights(d, dense=False, expert_ids=[0], dtype="bfloat16")
    assert w.experts[1].w13.dtype == torch.bfloat16


def test_bad_preset_and_dtype(tmp_path):
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        make_model(tmp_path / "x", "huge")
    with pytest.raises(ValueError, match="dtype 'int8'"):
        make_model(tmp_path / "x", "tiny", dtype="int8")


def test_default_model_is_built_once(tmp_path, monkeypatch):
    monkeypatch.setenv("GLM_RAY_CACHE", str(tmp_path))
    d = default_model_dir()
    stamp = (d / "model.safetensors").stat().st_mtime_ns
    assert default_model_dir() == d and (d / "model.safetensors").stat().st_mtime_ns == stamp
    assert load_model_config(d).hidden_size == 64
