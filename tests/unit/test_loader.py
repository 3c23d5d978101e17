"""Checkpoint loading: errors name the tensor and file; expert subsets read only what they need."""

import json
import shutil

import pytest
import safetensors
import torch
from safetensors.torch import load_file, save_file

import glm_ray.model.loader as loader_mod
from glm_ray.config import load_model_config
from glm_ray.model.loader import CheckpointError, load_model, load_weights
from glm_ray.model.synthetic import make_model


@pytest.fixture
def ckpt(tiny_model_dir, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(tiny_model_dir, d)
    return d


def rewrite(d, edit):
    tensors = load_file(str(d / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(d / "model.safetensors"))


def test_missing_tensor_is_named(ckpt):
    rewrite(ckpt, lambda t: t.pop("model.layers.2.mlp.experts.5.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor 'model\.layers\.2\.mlp\.experts\.5\.up_proj\.weight'"):
        load_weights(ckpt)


def test_unexpected_tensor_is_named_with_its_file(ckpt):
    rewrite(ckpt, lambda t: t.update({"model.layers.1.mlp.experts.8.up_proj.weight": torch.zeros(32, 64)}))
    with pytest.raises(CheckpointError) as e:
        load_weights(ckpt)
    assert "unexpected tensor 'model.layers.1.mlp.experts.8.up_proj.weight'" in str(e.value)
    assert "model.safetensors" in str(e.value)


def test_unexpected_layer_beyond_mtp(ckpt):
    rewrite(ckpt, lambda t: t.update({"model.layers.7.input_layernorm.weight": torch.ones(64)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model\.layers\.7\.input_layernorm\.weight'"):
        load_weights(ckpt)


def test_wrong_shape_is_named(ckpt):
    rewrite(ckpt, lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": torch.zeros(16, 64)}))
    with pytest.raises(CheckpointError, match=r"'model\.layers\.0\.self_attn\.k_proj\.weight' has shape \[16, 64\], "
                                              r"expected \[32, 64\]"):
        load_weights(ckpt)


def test_truncated_file(ckpt):
    path = ckpt / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors: not a readable safetensors file"):
        load_weights(ckpt)


def test_corrupt_header(ckpt):
    path = ckpt / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:20] = b"\x00garbage!!\xff\xfe"
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_weights(ckpt)


def test_no_weights_at_all(ckpt):
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no .safetensors file"):
        load_weights(ckpt)


def test_sharded_missing_shard_and_bad_index(tmp_path):
    d = make_model(tmp_path / "sharded", "tiny", shards=3)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 3
    model, experts, _ = load_model(d)  # loads fine as written
    (d / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model-00002-of-00003\.safetensors: checkpoint file is missing"):
        load_weights(d)


def test_index_pointing_to_the_wrong_file(tmp_path):
    d = make_model(tmp_path / "sharded", "tiny", shards=2)
    path = d / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    name = "model.norm.weight"
    files = sorted(set(index["weight_map"].values()))
    index["weight_map"][name] = next(f for f in files if f != index["weight_map"][name])
    path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"index lists tensor 'model\.norm\.weight' there"):
        load_weights(d)


def test_expert_subset_reads_only_its_experts(tiny_model_dir, monkeypatch):
    """Count real safetensors reads: a loader for experts {2, 5} never reads another expert."""
    reads = []
    real_open = safetensors.safe_open

    class CountingHandle:
        def __init__(self, handle):
            self.handle = handle

        def __getattr__(self, attr):
            return getattr(self.handle, attr)

        def get_tensor(self, name):
            reads.append(name)
            return self.handle.get_tensor(name)

    monkeypatch.setattr(loader_mod, "safe_open", lambda *a, **k: CountingHandle(real_open(*a, **k)))
    w = load_weights(tiny_model_dir, dense=False, expert_ids=[2, 5])
    config = load_model_config(tiny_model_dir)
    assert sorted(reads) == sorted(w.read_names)
    expected = {f"model.layers.{layer}.mlp.experts.{e}.{p}_proj.weight"
                for layer in config.moe_layers for e in (2, 5) for p in ("gate", "up", "down")}
    assert set(reads) == expected
    assert w.dense == {}
    assert [w.experts[layer].w13.shape[0] for layer in config.moe_layers] == [2, 2, 2]


def test_subset_experts_equal_the_full_load(tiny_model_dir):
    full = load_weights(tiny_model_dir)
    part = load_weights(tiny_model_dir, dense=False, expert_ids=[6, 1])
    for layer, held in part.experts.items():
        assert held.expert_ids == [1, 6]
        torch.testing.assert_close(held.w13, full.experts[layer].w13[[1, 6]], rtol=0, atol=0)
        torch.testing.assert_close(held.w2, full.experts[layer].w2[[1, 6]], rtol=0, atol=0)


def test_fused_weights_match_the_checkpoint(tiny_model_dir):
    raw = load_file(str(tiny_model_dir / "model.safetensors"))
    w = load_weights(tiny_model_dir)
    qkv = w.dense["layers.1.self_attn.qkv_proj.weight"]
    want = torch.cat([raw[f"model.layers.1.self_attn.{p}_proj.weight"] for p in "qkv"])
    assert torch.equal(qkv, want)
    w13 = w.experts[2].w13[3]
    assert torch.equal(w13, torch.cat([raw[f"model.layers.2.mlp.experts.3.{p}_proj.weight"] for p in ("gate", "up")]))


def test_bf16_checkpoint_dtypes(tmp_path, monkeypatch):
    import glm_ray.model.cpu as cpu

    monkeypatch.setattr(cpu, "this_cpu_has_native_bf16", lambda: True)  # auto keeps the checkpoint's bf16
    d = make_model(tmp_path / "bf16", "tiny", dtype="bfloat16")
    auto = load_weights(d)
    assert auto.dense["layers.1.self_attn.qkv_proj.weight"].dtype == torch.bfloat16
    assert auto.experts[1].w13.dtype == torch.bfloat16
    assert auto.dense["layers.1.mlp.gate.weight"].dtype == torch.float32  # router stays fp32
    assert auto.dense["layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    f32 = load_weights(d, dtype="float32")
    assert f32.dense["embed_tokens.weight"].dtype == torch.float32
    assert torch.equal(f32.dense["embed_tokens.weight"], auto.dense["embed_tokens.weight"].float())
    with pytest.raises(ValueError, match="dtype 'float64'"):
        load_weights(d, dtype="float64")


@pytest.mark.parametrize("layout, extra", [("glm-4.6", 4), ("glm-4.5", 6)])
def test_mtp_layer_is_recognised_and_kept_out(tmp_path, layout, extra):
    d = make_model(tmp_path / "mtp", "tiny", mtp=layout)
    w = load_weights(d)
    assert w.mtp_names and all(n.startswith("model.layers.4.") for n in w.mtp_names)
    assert sum(1 for n in w.mtp_names if n.split("model.layers.4.")[1].split(".")[0] in
               ("enorm", "hnorm", "eh_proj", "shared_head", "embed_tokens")) == extra
    assert not any(n.startswith("model.layers.4.") for n in w.read_names)


def test_no_routed_expert_in_the_dense_part(tiny_model_dir):
    model, experts, config = load_model(tiny_model_dir)
    names = [n for n, _ in model.named_parameters()]
    assert not any("experts." in n and "shared_experts" not in n for n in names)
    assert experts.numel() == len(config.moe_layers) * 8 * 3 * 32 * 64


def test_auto_dtype_is_fp32_on_a_cpu_without_native_bf16(tmp_path, monkeypatch):
    import glm_ray.model.cpu as cpu

    d = make_model(tmp_path / "bf16", "tiny", dtype="bfloat16")
    monkeypatch.setattr(cpu, "this_cpu_has_native_bf16", lambda: False)
    auto = load_weights(d)
    assert auto.dense["layers.1.self_attn.qkv_proj.weight"].dtype == torch.float32  # upcast at load
    assert auto.experts[1].w13.dtype == torch.float32
    assert load_weights(d, dtype="bfloat16").experts[1].w13.dtype == torch.bfloat16  # explicit bf16 is bf16
    f32_checkpoint = make_model(tmp_path / "f32", "tiny", dtype="float32")
    assert load_weights(f32_checkpoint).experts[1].w13.dtype == torch.float32


def test_a_bf16_checkpoints_experts_stay_bf16_where_the_cpu_kernel_computes_them_in_fp32(tmp_path):
    from glm_ray.experts import swiglu_kernel

    if swiglu_kernel.unavailable_reason() is not None:
        pytest.skip(f"C kernel unavailable: {swiglu_kernel.unavailable_reason()}")
    d = make_model(tmp_path / "bf16", "tiny", dtype="bfloat16")
    compact = load_weights(d, dtype="float32", expert_backend="cpu-kernel")
    assert compact.experts[1].w13.dtype == compact.experts[1].w2.dtype == torch.bfloat16
    assert compact.experts[1].compute_dtype == torch.float32
    assert compact.dense["layers.1.self_attn.qkv_proj.weight"].dtype == torch.float32  # only the routed experts
    upcast = load_weights(d, dtype="float32")  # no backend named: upcast at load, as before
    assert upcast.experts[1].w13.dtype == torch.float32
    assert torch.equal(compact.experts[1].w13.float(), upcast.experts[1].w13)
    assert load_weights(d, dtype="float32", expert_backend="torch").experts[1].w13.dtype == torch.float32
    f32 = make_model(tmp_path / "f32", "tiny", dtype="float32")
    assert load_weights(f32, dtype="float32", expert_backend="cpu-kernel").experts[1].w13.dtype == torch.float32


@pytest.mark.parametrize("machine, flags, native", [
    ("x86_64", "fpu sse avx2 fma", False),
    ("x86_64", "fpu avx2 avx512f avx512_bf16", True),
    ("x86_64", "fpu avx2 amx_bf16 amx_tile", True),
    ("aarch64", "fp asimd sve", False),
    ("aarch64", "fp asimd sve bf16 i8mm", True),
    ("riscv64", "rv64imafdc", True),  # unknown: keep the checkpoint's dtype
])
def test_native_bf16_from_cpuinfo(machine, flags, native):
    from glm_ray.model.cpu import native_bf16

    key = "Features" if machine == "aarch64" else "flags"
    assert native_bf16(f"processor\t: 0\n{key}\t\t: {flags}\n", machine) is native
    assert native_bf16("", machine) is True  # nothing to read: no change


def test_expert_reader_reads_one_expert_as_load_weights_stacks_it(tiny_model_dir):
    from glm_ray.model.loader import ExpertReader

    config = load_model_config(tiny_model_dir)
    layer = config.moe_layers[1]
    want = load_weights(tiny_model_dir, dtype="float32", dense=False, expert_ids=[5]).experts[layer]
    reader = ExpertReader(tiny_model_dir, config, "float32")
    w13, w2 = torch.empty_like(want.w13[0]), torch.empty_like(want.w2[0])
    reader.read_into(layer, 5, w13, w2)
    assert torch.equal(w13, want.w13[0]) and torch.equal(w2, want.w2[0])
    assert reader.reader.read == [f"model.layers.{layer}.mlp.experts.5.{p}_proj.weight" for p in ("gate", "up", "down")]
    with pytest.raises(ValueError, match=f"no routed expert 99 in layer {layer}"):
        reader.read_into(layer, 99, w13, w2)
    with pytest.raises(ValueError, match="no routed expert 0 in layer 0"):
        reader.read_into(0, 0, w13, w2)  # the first layer is dense
