"""`glm-ray plan` against a hand computation from the spec's shapes (glm-spec.md §1.1, §1.3, §2).

The expected figures below are written out from the tensor list, not taken from glm_ray.plan.
"""

import json
import math
import subprocess
import sys

import pytest

from glm_ray.cli import main
from glm_ray.config import load_model_config
from glm_ray.model.known_configs import GLM_4_5_AIR, KNOWN_CONFIGS, known_config
from glm_ray.plan import PlanInputs, make_plan, parse_memory

GiB = 2**30
H200, H100 = 141 * GiB, 80 * GiB


def hand_sizes(H, V, L, dense, E, I_dense, I_moe, qk_norm):
    """Bytes in bf16, following glm-spec §2 tensor by tensor (router and its bias in fp32)."""
    moe = L - dense
    q, kv = 96 * 128, 8 * 128
    bf16_params = (
        V * H  # embed_tokens
        + V * H  # lm_head (untied)
        + L * (q * H + kv * H + kv * H + H * q)  # q/k/v/o_proj
        + L * (q + kv + kv)  # q/k/v biases
        + (L * 2 * 128 if qk_norm else 0)  # q_norm, k_norm
        + L * 2 * H + H  # input/post-attention norms + final norm
        + dense * 3 * I_dense * H  # dense gate/up/down
        + moe * 3 * I_moe * H  # one shared expert per MoE layer
    )
    fp32_params = moe * E * H + moe * E  # mlp.gate.weight + e_score_correction_bias
    routed = moe * E * 3 * H * I_moe * 2
    per_expert = moe * 3 * H * I_moe * 2
    return {"non_expert": 2 * bf16_params + 4 * fp32_params, "routed": routed, "per_expert": per_expert}


GLM46 = hand_sizes(H=5120, V=151552, L=92, dense=3, E=160, I_dense=12288, I_moe=1536, qk_norm=True)
AIR = hand_sizes(H=4096, V=151552, L=46, dense=1, E=128, I_dense=10944, I_moe=1408, qk_norm=False)


def hand_smallest_groups(experts, per_expert, usable):
    """Try G = 1, 2, ...: the first whose largest contiguous group (ceil(E / G) experts) fits."""
    for g in range(1, experts + 1):
        if math.ceil(experts / g) * per_expert <= usable:
            return g
    raise AssertionError("nothing fits")


def split_sizes(e, g):
    """Contiguous near-equal ranges: the first e % g groups hold one expert more."""
    return tuple(e // g + (1 if i < e % g else 0) for i in range(g))


def plan(name, gpu_memory, **kw):
    return make_plan(PlanInputs(known_config(name), name, gpu_memory, 8, **kw))


def test_glm46_weights_match_the_hand_computation():
    p = plan("glm-4.6", H200)
    assert p.routed_experts.num_bytes == 89 * 160 * 3 * 5120 * 1536 * 2 == GLM46["routed"] == 671_927_500_800
    assert round(p.routed_experts.num_bytes / 1e9, 2) == 671.93  # design.md: ~672 GB routed
    assert p.non_expert_bytes == GLM46["non_expert"]
    assert 33e9 < p.non_expert_bytes < 34e9  # design.md: ~33 GB rest
    assert p.per_expert.num_bytes == GLM46["per_expert"]
    assert p.routed_experts.formula == "89 MoE layers x 160 experts x 3 x 5120 x 1536 x 2 B"


def test_air_weights_match_the_hand_computation():
    p = plan("glm-4.5-air", H200)
    assert p.routed_experts.num_bytes == 45 * 128 * 3 * 4096 * 1408 * 2 == AIR["routed"]
    assert p.non_expert_bytes == AIR["non_expert"]
    assert dict((t.key, t.num_bytes) for t in p.non_expert)["qk_norm"] == 0  # Air has no QK-norm


def test_kv_bytes_per_token_are_bf16():
    assert plan("glm-4.6", H200).kv_per_token.num_bytes == 92 * 2 * 8 * 128 * 2 == 368 * 1024
    assert plan("glm-4.5-air", H200).kv_per_token.num_bytes == 184 * 1024
    assert plan("glm-4.6", H200, dtype="float8").kv_per_token.num_bytes == 368 * 1024


@pytest.mark.parametrize("name, sizes, gpu, groups, attention_gpus, nodes", [
    ("glm-4.6", GLM46, H200, 5, 1, 1),
    ("glm-4.6", GLM46, H100, 9, 2, 2),  # weights + 128K of KV (83.2 GB) overflow one 72 GiB usable GPU
    ("glm-4.5-air", AIR, H200, 2, 1, 1),
    ("glm-4.5-air", AIR, H100, 3, 1, 1),
])
def test_smallest_cluster(name, sizes, gpu, groups, attention_gpus, nodes):
    p = plan(name, gpu)
    usable = int(gpu * 0.9)
    assert p.usable_per_gpu.num_bytes == usable
    assert p.smallest_expert_groups == p.expert_groups == groups
    assert hand_smallest_groups(p.inputs.config.n_routed_experts, sizes["per_expert"], usable) == groups
    assert p.expert_groups_fit and max(p.experts_per_group) * sizes["per_expert"] <= usable
    assert p.attention_gpus == attention_gpus
    need = sizes["non_expert"] + 131072 * p.kv_per_token.num_bytes
    assert need <= attention_gpus * usable and (attention_gpus == 1 or need > usable)
    assert p.kv_tokens_per_replica == (attention_gpus * usable - sizes["non_expert"]) // p.kv_per_token.num_bytes
    assert p.sequences_per_replica == p.kv_tokens_per_replica // 131072
    assert p.total_gpus == attention_gpus + groups and p.nodes == math.ceil((attention_gpus + groups) / 8) == nodes


def test_glm46_h200_figures():
    p = plan("glm-4.6", H200)
    assert p.experts_per_group == (32,) * 5
    assert p.kv_tokens_per_replica == 271_855 and p.sequences_per_replica == 2


def test_float8_halves_matmul_weights_only():
    bf, f8 = plan("glm-4.6", H200), plan("glm-4.6", H200, dtype="float8")
    assert f8.routed_experts.num_bytes * 2 == bf.routed_experts.num_bytes
    b, f = ({t.key: t.num_bytes for t in x.non_expert} for x in (bf, f8))
    for key in ("attention_qkvo", "dense_mlp", "shared_experts"):
        assert f[key] * 2 == b[key]
    for key in ("embed_tokens", "lm_head", "rms_norms", "router", "e_score_correction_bias", "attention_qkv_bias"):
        assert f[key] == b[key]
    assert f8.smallest_expert_groups == 3  # 64 experts of 2.1 GB per 141 GiB GPU


def test_given_expert_groups_that_do_not_fit_name_the_smallest(capsys):
    assert main(["plan", "--model", "glm-4.5-air", "--gpu-memory", "80GiB", "--gpus-per-node", "8",
                 "--expert-groups", "2"]) == 1
    out = capsys.readouterr().out
    assert "DOES NOT FIT" in out and "the smallest G that fits is 3" in out
    p = plan("glm-4.5-air", H100, expert_groups=4)
    assert p.expert_groups_fit and p.expert_groups == 4 and p.experts_per_group == (32, 32, 32, 32)
    assert split_sizes(160, 9) == plan("glm-4.6", H100).experts_per_group


def test_text_output_shows_the_arithmetic(capsys):
    assert main(["plan", "--model", "glm-4.6", "--gpu-memory", "141GiB", "--gpus-per-node", "8"]) == 0
    out = capsys.readouterr().out
    assert "89 MoE layers x 160 experts x 3 x 5120 x 1536 x 2 B = 671,927,500,800 B = 671.93 GB" in out
    assert "92 layers x 2 x 8 kv_heads x 128 x 2 B = 376,832 B (368 KiB)" in out
    assert "ceil(160 / 32) = 5" in out and "ceil(6 / 8) = 1" in out
    assert "MTP layer" in out and "bf16 for either weight dtype" in out


JSON_KEYS = {
    "model", "config_source", "dtype", "gpu_memory_bytes", "gpus_per_node", "memory_utilization", "context",
    "usable_bytes_per_gpu", "non_expert_bytes", "non_expert_breakdown_bytes", "routed_expert_bytes",
    "bytes_per_expert", "experts_per_group", "routed_expert_bytes_per_group", "kv_bytes_per_token",
    "attention_gpus_per_replica", "attention_need_bytes", "kv_tokens_per_replica", "sequences_per_replica",
    "max_experts_per_gpu", "gpus_per_expert_group", "expert_groups", "expert_groups_fit",
    "smallest_expert_groups", "total_gpus", "nodes", "formulas",
}


def run_json(capsys, model, *extra):
    assert main(["plan", "--model", model, "--gpu-memory", "141GiB", "--gpus-per-node", "8", "--json", *extra]) == 0
    return json.loads(capsys.readouterr().out)


def test_json_keys_and_figures(capsys):
    d = run_json(capsys, "glm-4.6")
    assert set(d) == JSON_KEYS
    assert d["routed_expert_bytes"] == GLM46["routed"] and d["non_expert_bytes"] == GLM46["non_expert"]
    assert d["kv_bytes_per_token"] == 376832 and d["expert_groups"] == 5 and d["nodes"] == 1
    assert d["routed_expert_bytes_per_group"] == [32 * GLM46["per_expert"]] * 5
    assert sum(d["non_expert_breakdown_bytes"].values()) == d["non_expert_bytes"]


def test_model_dir_and_config_file_match_the_built_in_name(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(GLM_4_5_AIR))
    assert load_model_config(tmp_path) == known_config("glm-4.5-air")
    by_name = run_json(capsys, "glm-4.5-air")
    for model in (str(tmp_path), str(tmp_path / "config.json")):
        d = run_json(capsys, model)
        assert d["model"] == model
        assert {k: v for k, v in d.items() if k not in ("model", "config_source")} == \
            {k: v for k, v in by_name.items() if k not in ("model", "config_source")}


def test_known_configs_follow_the_spec_table():
    for name in KNOWN_CONFIGS:
        c = known_config(name)
        assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.vocab_size) == (96, 8, 128, 151552)
        assert c.rope_theta == 1e6 and c.eos_token_ids == (151329, 151336, 151338) and not c.tie_word_embeddings
    assert known_config("GLM-4.6").max_position_embeddings == 202752
    assert known_config("glm-4.5").max_position_embeddings == 131072
    air = known_config("glm-4.5-air")
    assert (air.hidden_size, air.num_hidden_layers, air.n_routed_experts, air.use_qk_norm) == (4096, 46, 128, False)


def test_memory_units():
    assert parse_memory("141GiB") == 141 * 2**30
    assert parse_memory("80GB") == 80 * 10**9
    assert parse_memory("1.5TiB") == 3 * 2**39 and parse_memory("512 MiB") == 512 * 2**20
    assert parse_memory("2TB") == 2 * 10**12 and parse_memory("100mb") == 10**8


@pytest.mark.parametrize("bad", ["141", "141XB", "GiB", "-5GiB", "0GB"])
def test_bad_gpu_memory_is_a_cli_error(bad, capsys):
    with pytest.raises(SystemExit) as e:
        main(["plan", "--model", "glm-4.6", f"--gpu-memory={bad}", "--gpus-per-node", "8"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--gpu-memory" in err and repr(bad) in err and "GiB" in err


def test_missing_model_is_a_cli_error(tmp_path):
    for model in ("glm-9", str(tmp_path / "nowhere")):
        with pytest.raises(SystemExit) as e:
            main(["plan", "--model", model, "--gpu-memory", "141GiB", "--gpus-per-node", "8"])
        assert str(e.value).startswith(f"glm-ray: error: --model {model}: not a built-in name")
    with pytest.raises(SystemExit) as e:  # a directory without config.json
        main(["plan", "--model", str(tmp_path), "--gpu-memory", "141GiB", "--gpus-per-node", "8"])
    assert "no config.json" in str(e.value)


def test_values_that_cannot_be_planned_are_named():
    base = ["plan", "--model", "glm-4.6", "--gpus-per-node", "8"]
    with pytest.raises(SystemExit, match="--expert-groups 161 exceeds glm-4.6's 160"):
        main([*base, "--gpu-memory", "141GiB", "--expert-groups", "161"])
    with pytest.raises(SystemExit, match="--context 300000 exceeds"):
        main([*base, "--gpu-memory", "141GiB", "--context", "300000"])
    with pytest.raises(SystemExit, match="attention replica needs 83.21 GB"):
        main([*base, "--gpu-memory", "4GB"])


def test_the_installed_command():
    out = subprocess.run([sys.executable, "-m", "glm_ray.cli", "plan", "--model", "glm-4.5-air", "--gpu-memory",
                          "80GiB", "--gpus-per-node", "8", "--json"], capture_output=True, text=True, check=True)
    d = json.loads(out.stdout)
    assert (d["expert_groups"], d["total_gpus"], d["nodes"], d["kv_bytes_per_token"]) == (3, 4, 1, 188416)
