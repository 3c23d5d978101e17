"""Exactness against the reference: transformers' `Glm4MoeForCausalLM` on the same directory, fp32.

Together the configs cover n_group > 1 with topk_group < n_group, qk-norm off, first_k_dense_replace
0 and 2, top-k 1 and 8, norm_topk_prob off, routed_scaling_factor 1.0 and 2.5, tied and untied
embeddings, sharded safetensors, bf16 weights, the v5 `rope_parameters` form and MTP layers.
"""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from glm_ray.model.loader import load_model  # noqa: E402
from glm_ray.model.reference import greedy_generate, prompt_logits  # noqa: E402
from glm_ray.model.synthetic import make_model  # noqa: E402

CASES = {
    "tiny": dict(),
    "groups-tied-no-qknorm": dict(overrides=dict(
        n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4, use_qk_norm=False,
        first_k_dense_replace=0, norm_topk_prob=False, routed_scaling_factor=1.0, tie_word_embeddings=True)),
    "top8-dense2-sharded-mtp45": dict(overrides=dict(
        n_routed_experts=16, num_experts_per_tok=8, first_k_dense_replace=2, routed_scaling_factor=2.5,
        num_hidden_layers=5), shards=3, mtp="glm-4.5", rope_format="rope_parameters"),
    "top1-groups-mtp46": dict(overrides=dict(
        num_experts_per_tok=1, n_group=2, topk_group=1, attention_bias=False, routed_scaling_factor=1.0,
        num_attention_heads=8, num_key_value_heads=1), mtp="glm-4.6"),
    "bf16-weights-no-shared-bias": dict(overrides=dict(
        norm_topk_prob=False, partial_rotary_factor=1.0, num_key_value_heads=4), dtype="bfloat16", seed=3),
}

PROMPT_LENS = [1, 5, 17, 40, 9]


def prompts(vocab):
    g = torch.Generator().manual_seed(11)
    # stay below the special tokens at the top of the vocabulary
    return [torch.randint(0, vocab - 32, (n,), generator=g).tolist() for n in PROMPT_LENS]


@pytest.fixture(scope="module", params=list(CASES))
def pair(request, tmp_path_factory):
    case = CASES[request.param]
    d = make_model(tmp_path_factory.mktemp("parity") / request.param, "tiny", **case)
    ours = load_model(d, dtype="float32")
    hf = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    return ours, hf


def test_logits_match(pair):
    (model, experts, config), hf = pair
    batch = prompts(config.vocab_size)
    ours = prompt_logits(model, experts, batch)  # all prompts in one flat step
    for p, got in zip(batch, ours):
        with torch.no_grad():
            want = hf(torch.tensor([p])).logits[0].float()
        assert got.shape == want.shape
        assert (got - want).abs().max().item() <= 1e-4


def test_greedy_tokens_match(pair, monkeypatch):
    (model, experts, config), hf = pair
    batch = prompts(config.vocab_size)
    ours = greedy_generate(model, experts, batch, 32)  # no EOS: always 32 tokens
    # generate() fills an unset eos from the model's generation_config: clear it there
    monkeypatch.setattr(hf.generation_config, "eos_token_id", None)
    for p, got in zip(batch, ours):
        with torch.no_grad():
            out = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                              do_sample=False, max_new_tokens=32, pad_token_id=config.pad_token_id)
        want = out[0, len(p):].tolist()
        assert len(got) == 32 and got == want


def test_greedy_stops_at_eos_like_the_reference(pair):
    (model, experts, config), hf = pair
    batch = prompts(config.vocab_size)
    ours = greedy_generate(model, experts, batch, 32, config.eos_token_ids)
    for p, got in zip(batch, ours):
        with torch.no_grad():
            out = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                              do_sample=False, max_new_tokens=32, eos_token_id=list(config.eos_token_ids),
                              pad_token_id=config.pad_token_id)
        assert got == out[0, len(p):].tolist()
        assert len(got) == 32 or got[-1] in config.eos_token_ids


def test_hf_loads_the_same_config(pair):
    (model, experts, config), hf = pair
    c = hf.config
    assert (c.num_hidden_layers, c.n_routed_experts, c.num_experts_per_tok, c.n_group, c.topk_group) == (
        config.num_hidden_layers, config.n_routed_experts, config.num_experts_per_tok, config.n_group,
        config.topk_group)
    assert c.use_qk_norm == config.use_qk_norm and c.tie_word_embeddings == config.tie_word_embeddings
