"""Load an HF-format GLM-4 MoE checkpoint directory (single or sharded safetensors).

Everything is checked against the config before any tensor data is read: every name must map
somewhere (names.py), nothing required may be missing, every shape must match. Data is then read
lazily, one tensor at a time, so a loader asked for a subset of routed experts never touches the
others on disk. Errors name the tensor and the file; nothing is ever silently initialised.
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from glm_ray.config import ModelConfig, load_model_config
from glm_ray.experts.local import ExpertWeights, LocalExperts
from glm_ray.model.names import (
    Target, checkpoint_shape, expected_checkpoint_names, expected_dense_shapes, map_name, part_rows,
)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_FLOAT_DTYPES = {"BF16", "F16", "F32"}
PROGRESS_MIN_BYTES = 512 << 20  # below this a progress bar is noise
log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the tensor and/or the file."""


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype, config: ModelConfig, native_bf16: bool | None = None,
                  device: torch.device | str = "cpu") -> torch.dtype:
    """`auto` is the checkpoint's dtype, except bf16 on a CPU without native bf16 matrix
    instructions, where fp32 is ~3x faster (glm_ray/model/cpu.py): the weights are upcast at load.
    On a GPU `auto` is the checkpoint's dtype. An explicit dtype is taken as given."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        want = DTYPES[config.torch_dtype]
        if torch.device(device).type != "cpu":
            return want
        if native_bf16 is None:
            from glm_ray.model.cpu import this_cpu_has_native_bf16

            native_bf16 = this_cpu_has_native_bf16()
        if want == torch.bfloat16 and not native_bf16:
            _log_upcast_once()
            return torch.float32
        return want
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


@functools.lru_cache(maxsize=1)
def _log_upcast_once() -> None:
    log.warning("dtype auto: the checkpoint is bfloat16 but this CPU has no native bf16 matrix instructions "
                "(AVX-512 BF16 / AMX / Arm BF16), so the model computes in float32 (bf16 weights upcast at load, "
                "~3x faster here); pass dtype bfloat16 to keep bf16")


def compact_experts(compute_dtype: torch.dtype, checkpoint_dtypes: set[str], device: torch.device,
                    backend: str | None) -> bool:
    """Whether routed experts stay in the checkpoint's bf16 while they compute in fp32: on CPU, with
    the `cpu-kernel` backend, whose C kernel widens each weight as it reads it (exact, so the same
    bits as weights upcast at load) for half the memory, and half the memory traffic of a decode
    step, which reading the experts' weights bounds (BENCHMARKS.md, issue 18). Large prefills take
    torch's matmuls on widened copies of the experts with rows, a bounded chunk at a time
    (experts/local.py)."""
    from glm_ray.experts import swiglu_kernel

    return (backend == "cpu-kernel" and device.type == "cpu" and compute_dtype == torch.float32
            and checkpoint_dtypes == {"BF16"} and swiglu_kernel.load() is not None)


@functools.lru_cache(maxsize=1)
def _log_compact_once() -> None:
    log.info("routed experts held in bfloat16 as in the checkpoint and computed in float32 (each weight widened "
             "as the C kernel reads it: the same results as upcast at load, half the memory)")


@dataclass
class LoadedWeights:
    dense: dict[str, torch.Tensor]  # internal name -> tensor (fused)
    experts: dict[int, ExpertWeights]  # MoE layer -> the chosen experts' stacks
    mtp_names: list[str]  # tensors of the MTP layer(s), recognised and kept out
    read_names: list[str] = field(default_factory=list)  # checkpoint tensors whose data was read


def _checkpoint_files(model_dir: Path) -> tuple[list[Path], dict[str, str] | None]:
    index = model_dir / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e!r})") from None
        return sorted({model_dir / f for f in weight_map.values()}), weight_map
    if (model_dir / SINGLE_FILE).is_file():
        return [model_dir / SINGLE_FILE], None
    files = sorted(model_dir.glob("*.safetensors"))
    if len(files) == 1:
        return files, None
    what = "several .safetensors files but no index" if files else "no .safetensors file"
    raise CheckpointError(f"{model_dir}: {what} (expected {SINGLE_FILE} or {INDEX_FILE})")


def _open(path: Path):
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file is missing")
    try:
        return safe_open(str(path), framework="pt")
    except Exception as e:  # safetensors raises its own error types for bad headers and short files
        raise CheckpointError(f"{path}: not a readable safetensors file, truncated or corrupt ({e})") from None


class _Reader:
    """Name -> file, shapes from headers; reads one tensor's data on demand."""

    def __init__(self, model_dir: Path):
        files, weight_map = _checkpoint_files(model_dir)
        self.handles = {p.name: _open(p) for p in files}
        self.file_of: dict[str, str] = {}
        for fname, h in self.handles.items():
            for name in h.keys():
                self.file_of[name] = fname
        if weight_map is not None:
            for name, fname in weight_map.items():
                if self.file_of.get(name) != fname:
                    raise CheckpointError(f"{model_dir / fname}: index lists tensor '{name}' there, but the file "
                                          "does not hold it")
        self.read: list[str] = []

    def shape_dtype(self, name: str) -> tuple[tuple[int, ...], str]:
        s = self.handles[self.file_of[name]].get_slice(name)
        return tuple(s.get_shape()), s.get_dtype()

    def get(self, name: str) -> torch.Tensor:
        self.read.append(name)
        try:
            return self.handles[self.file_of[name]].get_tensor(name)
        except Exception as e:
            raise CheckpointError(f"{self.file_of[name]}: cannot read tensor '{name}' ({e})") from None


def _plan(reader: _Reader, config: ModelConfig, model_dir: Path) -> tuple[dict[str, Target], list[str]]:
    targets, mtp = {}, []
    for name, fname in reader.file_of.items():
        target = map_name(name, config)
        if target is None:
            if name == "lm_head.weight" and config.tie_word_embeddings:
                continue  # tied: the embedding serves as the head
            raise CheckpointError(f"{model_dir / fname}: unexpected tensor '{name}' (not part of a "
                                  f"{config.num_hidden_layers}-layer GLM-4 MoE with this config)")
        if target.kind == "mtp":
            mtp.append(name)
            continue
        shape, dtype = reader.shape_dtype(name)
        want = checkpoint_shape(target, config)
        if shape != want:
            raise CheckpointError(f"{model_dir / fname}: tensor '{name}' has shape {list(shape)}, "
                                  f"expected {list(want)}")
        if dtype not in _FLOAT_DTYPES:
            raise CheckpointError(f"{model_dir / fname}: tensor '{name}' has dtype {dtype}, expected BF16/F16/F32")
        targets[name] = target
    missing = [n for n in expected_checkpoint_names(config) if n not in targets]
    if missing:
        where = ", ".join(sorted(reader.handles))
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{model_dir}: missing tensor '{missing[0]}'{more}; not found in {where}")
    return targets, sorted(mtp)


def load_weights(
    model_dir: str | Path,
    config: ModelConfig | None = None,
    *,
    dtype: str | torch.dtype = "auto",
    dense: bool = True,
    expert_ids: list[int] | range | None = None,
    progress: bool | None = None,
    device: torch.device | str = "cpu",
    expert_backend: str | None = None,
) -> LoadedWeights:
    """Read a checkpoint. `dense=False` skips every non-expert tensor; `expert_ids` (None = all)
    chooses which routed experts to read, the same ids in every MoE layer. Tensors land on
    `device` one at a time (no second host copy of the model). expert_backend: the backend that
    will compute the experts (experts/compute.py: the name of the chosen one); `cpu-kernel` may
    keep a bf16 checkpoint's experts in bf16 (`compact_experts`)."""
    model_dir = Path(model_dir)
    config = config or load_model_config(model_dir)
    device = torch.device(device)
    dt = resolve_dtype(dtype, config, device=device)
    reader = _Reader(model_dir)
    targets, mtp = _plan(reader, config, model_dir)
    ids = list(range(config.n_routed_experts)) if expert_ids is None else sorted(set(expert_ids))
    bad = [e for e in ids if not 0 <= e < config.n_routed_experts]
    if bad:
        raise ValueError(f"expert ids {bad} out of range 0..{config.n_routed_experts - 1}")
    wanted = set(ids)
    todo = [(n, t) for n, t in targets.items()
            if (t.kind == "dense" and dense) or (t.kind == "expert" and t.expert in wanted)]

    shapes = expected_dense_shapes(config)
    out: dict[str, torch.Tensor] = {}
    h, i = config.hidden_size, config.moe_intermediate_size
    slot = {e: s for s, e in enumerate(ids)}
    expert_dtypes = {reader.shape_dtype(n)[1] for n, t in todo if t.kind == "expert"}
    held_dt = dt
    if expert_dtypes and compact_experts(dt, expert_dtypes, device, expert_backend):
        held_dt = torch.bfloat16
        _log_compact_once()
    stacks = {layer: (torch.empty(len(ids), 2 * i, h, dtype=held_dt, device=device),
                      torch.empty(len(ids), h, i, dtype=held_dt, device=device))
              for layer in config.moe_layers}
    nbytes = sum(torch.Size(checkpoint_shape(t, config)).numel() for _, t in todo) * dt.itemsize
    show = progress if progress is not None else (nbytes >= PROGRESS_MIN_BYTES)
    for name, t in tqdm(todo, desc=f"loading {model_dir.name}", unit="tensor", disable=not show):
        tensor = reader.get(name)
        if t.kind == "expert":
            w13, w2 = stacks[t.layer]
            if t.name == "w2":
                w2[slot[t.expert]].copy_(tensor)
            else:
                start, stop = (0, i) if t.part == "gate" else (i, 2 * i)
                w13[slot[t.expert], start:stop].copy_(tensor)
            continue
        keep_fp32 = ".mlp.gate." in t.name  # the router always runs in fp32
        target_dtype = torch.float32 if keep_fp32 else dt
        fused = shapes[t.name]
        if t.part is None:
            out[t.name] = tensor.to(device=device, dtype=target_dtype)
        else:
            buf = out.setdefault(t.name, torch.empty(fused, dtype=target_dtype, device=device))
            start, stop = part_rows(fused[0], t.part, config)
            buf[start:stop].copy_(tensor)
    experts = {layer: ExpertWeights(ids, w13, w2, config.n_routed_experts, compute_dtype=dt).to_slots_on(device)
               for layer, (w13, w2) in stacks.items()}
    return LoadedWeights(out, experts, mtp, reader.read)


class ExpertReader:
    """One routed expert of one MoE layer at a time, straight from the checkpoint into given
    tensors: for a serving replica building new slots (experts/slots.py), which must not spend
    the Python time of `load_weights`' whole-checkpoint plan while it serves."""

    def __init__(self, model_dir: str | Path, config: ModelConfig, dtype: str | torch.dtype = "auto",
                 device: torch.device | str = "cpu"):
        self.model_dir, self.config = Path(model_dir), config
        self.dtype = resolve_dtype(dtype, config, device=device)
        self.reader = _Reader(self.model_dir)

    def read_into(self, layer: int, expert: int, w13: torch.Tensor, w2: torch.Tensor) -> None:
        """w13 [2I, H] <- gate rows then up rows; w2 [H, I] <- down."""
        c = self.config
        if layer not in c.moe_layers or not 0 <= expert < c.n_routed_experts:
            raise ValueError(f"no routed expert {expert} in layer {layer} (MoE layers {list(c.moe_layers)}, "
                             f"{c.n_routed_experts} experts)")
        i = c.moe_intermediate_size
        p = f"model.layers.{layer}.mlp.experts.{expert}."
        for part, out, want in (("gate", w13[:i], (i, c.hidden_size)), ("up", w13[i:], (i, c.hidden_size)),
                                ("down", w2, (c.hidden_size, i))):
            name = p + f"{part}_proj.weight"
            if name not in self.reader.file_of:
                raise CheckpointError(f"{self.model_dir}: missing tensor '{name}'")
            tensor = self.reader.get(name)
            if tuple(tensor.shape) != want:
                raise CheckpointError(f"{self.model_dir / self.reader.file_of[name]}: tensor '{name}' has shape "
                                      f"{list(tensor.shape)}, expected {list(want)}")
            out.copy_(tensor)


def load_model(model_dir: str | Path, *, dtype: str | torch.dtype = "auto", progress: bool | None = None,
               with_experts: bool = True, device: torch.device | str = "cpu", expert_backend: str = "auto",
               kernel_threads: int | None = None):
    """(Glm4MoeModel, LocalExperts or None, ModelConfig), on `device`. `with_experts=False` reads no
    routed-expert tensor (an attention replica, whose experts are remote). kernel_threads: of the
    experts' C kernel (None: torch's)."""
    from glm_ray.experts.compute import select_compute
    from glm_ray.model.glm4_moe import Glm4MoeModel

    config = load_model_config(model_dir)
    device = torch.device(device)
    # a bad choice fails before loading
    compute = select_compute(expert_backend, device, kernel_threads=kernel_threads) if with_experts else None
    weights = load_weights(model_dir, config, dtype=dtype, progress=progress,
                           expert_ids=None if with_experts else [], device=device,
                           expert_backend=compute.name if compute is not None else None)
    with torch.device("meta"):
        model = Glm4MoeModel(config)
    model.load_state_dict(weights.dense, strict=True, assign=True)
    model.rotary = type(model.rotary)(config.rotary_dim, config.rope_theta).to(device)  # rebuilt off meta
    return model.eval(), (LocalExperts(weights.experts, compute) if with_experts else None), config
