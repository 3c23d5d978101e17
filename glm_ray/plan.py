"""`glm-ray plan`: how many GPUs and nodes serve a GLM-4 MoE model, from its config.json alone.

`make_plan(PlanInputs) -> Plan` is pure arithmetic over the config's shapes (glm-spec §2 tensor
list); every figure keeps its formula with the numbers substituted, so the report shows its work.
Byte rule: matmul weights inside the decoder layers (attention q/k/v/o, dense MLP, shared and
routed experts) take the weight dtype (bfloat16 2 B, float8 1 B, block scales not counted);
embed_tokens, lm_head, RMSNorm weights and q/k/v biases stay bf16 (2 B); the router weight and
e_score_correction_bias are fp32 (4 B), as glm_ray/model/moe.py holds them. The KV cache is bf16
for either weight dtype. The MTP layer is not counted: glm-ray does not load it.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from glm_ray.argtypes import number_in, positive_int
from glm_ray.config import ConfigError, ModelConfig, config_from_dict, load_model_config

WEIGHT_BYTES = {"bfloat16": 2, "float8": 1}  # matmul weights
BF16, FP32 = 2, 4  # embeddings, lm_head, norms, biases; router
KV_BYTES = 2  # the KV cache is bf16 whatever the weights are
UNITS = {"TiB": 2**40, "GiB": 2**30, "MiB": 2**20, "TB": 10**12, "GB": 10**9, "MB": 10**6}


class PlanError(ValueError):
    """Inputs that cannot be planned; the message names the value and what to change."""


@dataclass(frozen=True)
class PlanInputs:
    config: ModelConfig  # the model's shapes, from a config.json or a built-in name
    model_name: str  # how the user named the model, echoed in the report
    gpu_memory_bytes: int  # memory of one GPU
    gpus_per_node: int  # GPUs in one node; a tensor-parallel attention replica stays inside one
    dtype: str = "bfloat16"  # weight dtype: "bfloat16" or "float8"
    expert_groups: int | None = None  # G to check; None: the smallest G that fits
    context: int = 131072  # tokens of one sequence; an attention replica must hold at least one
    memory_utilization: float = 0.9  # share of each GPU's memory given to weights and KV cache

    def __post_init__(self):
        if self.dtype not in WEIGHT_BYTES:
            raise PlanError(f"dtype {self.dtype!r} is not one of {', '.join(WEIGHT_BYTES)}")
        for name in ("gpu_memory_bytes", "gpus_per_node", "context"):
            if getattr(self, name) < 1:
                raise PlanError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0 < self.memory_utilization <= 1:
            raise PlanError(f"memory_utilization must be in (0, 1], got {self.memory_utilization}")
        experts = self.config.n_routed_experts
        if self.expert_groups is not None and not 1 <= self.expert_groups <= experts:
            raise PlanError(f"expert_groups {self.expert_groups} must be between 1 and the model's "
                            f"{experts} routed experts")


@dataclass(frozen=True)
class Term:
    key: str  # stable name of the figure (also its JSON key)
    formula: str  # the arithmetic with the numbers substituted
    num_bytes: int  # its result


@dataclass(frozen=True)
class Plan:
    inputs: PlanInputs
    usable_per_gpu: Term  # gpu_memory x memory_utilization
    non_expert: tuple[Term, ...]  # every attention-side weight, by kind
    non_expert_bytes: int  # their sum: what each attention replica holds
    per_expert: Term  # one routed expert over every MoE layer
    routed_experts: Term  # all routed experts
    kv_per_token: Term  # KV-cache bytes of one token over every layer
    attention_gpus: int  # tensor-parallel GPUs of one attention replica
    attention_need: Term  # weights plus one --context sequence of KV
    kv_tokens_per_replica: int  # tokens of KV cache that fit beside the weights
    sequences_per_replica: int  # --context-long sequences that fit
    max_experts_per_gpu: int  # routed experts one GPU's usable memory holds
    smallest_expert_groups: int  # smallest G whose largest group fits one GPU
    expert_groups: int  # G planned (--expert-groups, or the smallest)
    experts_per_group: tuple[int, ...]  # contiguous near-equal split, larger groups first
    expert_groups_fit: bool  # whether G's largest group fits one GPU
    total_gpus: int  # attention GPUs + one GPU per expert group
    nodes: int  # ceil(total_gpus / gpus_per_node)


def _term(key: str, formula: str, value: int) -> Term:
    return Term(key, formula, int(value))


def non_expert_terms(c: ModelConfig, w: int) -> tuple[Term, ...]:
    """Embeddings, lm_head, attention, norms, dense MLP, routers and shared experts (glm-spec §2)."""
    L, H, V, M = c.num_hidden_layers, c.hidden_size, c.vocab_size, len(c.moe_layers)
    E, k, q, kv = c.n_routed_experts, c.first_k_dense_replace, c.q_size, c.kv_size
    shared = c.n_shared_experts * c.moe_intermediate_size
    terms = [
        _term("embed_tokens", f"{V} x {H} x {BF16} B", V * H * BF16),
        _term("lm_head", "tied to embed_tokens" if c.tie_word_embeddings else f"{V} x {H} x {BF16} B",
              0 if c.tie_word_embeddings else V * H * BF16),
        _term("attention_qkvo", f"{L} layers x ({q} x {H} + 2 x {kv} x {H} + {H} x {q}) x {w} B",
              L * (q * H + 2 * kv * H + H * q) * w),
        _term("attention_qkv_bias", f"{L} layers x ({q} + 2 x {kv}) x {BF16} B" if c.attention_bias else "none",
              L * (q + 2 * kv) * BF16 if c.attention_bias else 0),
        _term("qk_norm", f"{L} layers x 2 x {c.head_dim} x {BF16} B" if c.use_qk_norm else "none (use_qk_norm false)",
              L * 2 * c.head_dim * BF16 if c.use_qk_norm else 0),
        _term("rms_norms", f"(2 x {L} layers + 1 final) x {H} x {BF16} B", (2 * L + 1) * H * BF16),
        _term("dense_mlp", f"{k} dense layers x 3 x {H} x {c.intermediate_size} x {w} B",
              k * 3 * H * c.intermediate_size * w),
        _term("router", f"{M} MoE layers x {E} x {H} x {FP32} B", M * E * H * FP32),
        _term("e_score_correction_bias", f"{M} MoE layers x {E} x {FP32} B", M * E * FP32),
        _term("shared_experts", f"{M} MoE layers x 3 x {H} x {shared} x {w} B", M * 3 * H * shared * w),
    ]
    return tuple(terms)


def split_experts(num_experts: int, groups: int) -> tuple[int, ...]:
    """Contiguous near-equal ranges, as `Placement.contiguous` makes them: the first groups one larger."""
    base, extra = divmod(num_experts, groups)
    return tuple(base + (1 if g < extra else 0) for g in range(groups))


def _attention_gpus(c: ModelConfig, inp: PlanInputs, need: int, usable: int) -> int:
    """Smallest tensor-parallel width (a divisor of the KV heads, within one node) that holds `need`."""
    widths = [t for t in range(1, c.num_key_value_heads + 1)
              if c.num_key_value_heads % t == 0 and t <= inp.gpus_per_node]
    for t in widths:
        if need <= t * usable:
            return t
    raise PlanError(f"an attention replica needs {gb(need)} (weights plus one {inp.context}-token sequence of KV) "
                    f"but {max(widths)} GPUs hold {gb(max(widths) * usable)}: lower --context, use --dtype float8, "
                    f"or use GPUs with more memory than {gb(inp.gpu_memory_bytes)}")


def make_plan(inp: PlanInputs) -> Plan:
    """Weights, KV cache and the smallest cluster for `inp`; PlanError when no cluster of these GPUs fits."""
    c, w = inp.config, WEIGHT_BYTES[inp.dtype]
    if not c.moe_layers:
        raise PlanError(f"{c.source}: first_k_dense_replace {c.first_k_dense_replace} leaves no MoE layer "
                        f"of {c.num_hidden_layers}: there are no routed experts to place")
    M, E, H, I = len(c.moe_layers), c.n_routed_experts, c.hidden_size, c.moe_intermediate_size
    usable = _term("usable_per_gpu", f"{inp.gpu_memory_bytes} B x {inp.memory_utilization}",
                   math.floor(inp.gpu_memory_bytes * inp.memory_utilization))
    non_expert = non_expert_terms(c, w)
    weights = sum(t.num_bytes for t in non_expert)
    per_expert = _term("per_expert", f"{M} MoE layers x 3 x {H} x {I} x {w} B", M * 3 * H * I * w)
    routed = _term("routed_experts", f"{M} MoE layers x {E} experts x 3 x {H} x {I} x {w} B", M * E * 3 * H * I * w)
    L, kv_heads, d = c.num_hidden_layers, c.num_key_value_heads, c.head_dim
    kv = _term("kv_per_token", f"{L} layers x 2 x {kv_heads} kv_heads x {d} x {KV_BYTES} B",
               L * 2 * kv_heads * d * KV_BYTES)

    need = _term("attention_need", f"{weights} B weights + {inp.context} tokens x {kv.num_bytes} B",
                 weights + inp.context * kv.num_bytes)
    tp = _attention_gpus(c, inp, need.num_bytes, usable.num_bytes)
    kv_tokens = (tp * usable.num_bytes - weights) // kv.num_bytes

    per_gpu = usable.num_bytes // per_expert.num_bytes
    if per_gpu < 1:
        raise PlanError(f"one routed expert ({gb(per_expert.num_bytes)} over {M} MoE layers) does not fit "
                        f"one GPU's usable {gb(usable.num_bytes)}: use --dtype float8 or larger GPUs")
    smallest = math.ceil(E / per_gpu)
    groups = inp.expert_groups or smallest
    sizes = split_experts(E, groups)
    total = tp + groups
    return Plan(inputs=inp, usable_per_gpu=usable, non_expert=non_expert, non_expert_bytes=weights,
                per_expert=per_expert, routed_experts=routed, kv_per_token=kv, attention_gpus=tp,
                attention_need=need, kv_tokens_per_replica=kv_tokens,
                sequences_per_replica=kv_tokens // inp.context, max_experts_per_gpu=per_gpu,
                smallest_expert_groups=smallest, expert_groups=groups, experts_per_group=sizes,
                expert_groups_fit=max(sizes) <= per_gpu, total_gpus=total,
                nodes=math.ceil(total / inp.gpus_per_node))


# ---- rendering ---------------------------------------------------------------------------------

def gb(n: int) -> str:
    """Bytes in decimal GB and binary GiB (MB and MiB below 1 GB, where GB would print 0.00)."""
    if n >= 10**9:
        return f"{n / 1e9:,.2f} GB ({n / 2**30:,.2f} GiB)"
    return f"{n / 1e6:,.2f} MB ({n / 2**20:,.2f} MiB)" if n else "0 B"


def _line(label: str, formula: str, n: int) -> str:
    return f"  {label:<24}{formula} = {n:,} B = {gb(n)}"


def _group_sizes(sizes: tuple[int, ...]) -> str:
    counts = {s: sizes.count(s) for s in sorted(set(sizes), reverse=True)}
    return " + ".join(f"{n} x {s} experts" for s, n in counts.items())


def render_text(p: Plan) -> str:
    i, c = p.inputs, p.inputs.config
    w = WEIGHT_BYTES[i.dtype]
    lines = [
        f"glm-ray plan: {i.model_name}, {i.dtype} weights, GPUs of {gb(i.gpu_memory_bytes)}, "
        f"{i.gpus_per_node} per node, context {i.context} tokens",
        f"  config: {c.source}",
        f"  bytes: matmul weights (attention q/k/v/o, dense MLP, shared and routed experts) {w} B ({i.dtype}"
        f"{', block scales not counted' if i.dtype == 'float8' else ''}); embed_tokens, lm_head, norms, "
        "q/k/v biases 2 B (bf16); router and e_score_correction_bias 4 B (fp32)",
        f"  not counted: the MTP layer (num_nextn_predict_layers = {c.num_nextn_predict_layers}), a "
        "speculative-decoding draft glm-ray does not load",
        "",
        "Usable memory per GPU (gpu_memory x memory_utilization)",
        _line("usable", p.usable_per_gpu.formula, p.usable_per_gpu.num_bytes),
        "",
        "Non-expert weights (each attention replica holds them all)",
        *(_line(t.key, t.formula, t.num_bytes) for t in p.non_expert),
        f"  {'total':<24}{p.non_expert_bytes:,} B = {gb(p.non_expert_bytes)}",
        "",
        f"Routed experts ({len(c.moe_layers)} MoE layers x {c.n_routed_experts} experts)",
        _line("all", p.routed_experts.formula, p.routed_experts.num_bytes),
        _line("one expert", p.per_expert.formula, p.per_expert.num_bytes),
        f"  {'per group':<24}{_group_sizes(p.experts_per_group)}; largest {max(p.experts_per_group)} x "
        f"{p.per_expert.num_bytes:,} B = {gb(max(p.experts_per_group) * p.per_expert.num_bytes)}",
        "",
        "KV cache (bf16 for either weight dtype; main layers only, MTP layer not counted)",
        f"  {'per token':<24}{p.kv_per_token.formula} = {p.kv_per_token.num_bytes:,} B "
        f"({p.kv_per_token.num_bytes / 1024:g} KiB)",
        "",
        f"Attention replica: {p.attention_gpus} GPU{'s' if p.attention_gpus > 1 else ''}",
        _line("needs", p.attention_need.formula, p.attention_need.num_bytes),
        f"  {'fits':<24}{gb(p.attention_need.num_bytes)} <= {p.attention_gpus} x {gb(p.usable_per_gpu.num_bytes)}"
        + (f" (one GPU holds only {gb(p.usable_per_gpu.num_bytes)}: tensor-parallel across {p.attention_gpus} "
           "GPUs, weights and KV heads split evenly)" if p.attention_gpus > 1 else ""),
        f"  {'KV tokens':<24}({p.attention_gpus} x {p.usable_per_gpu.num_bytes} B - {p.non_expert_bytes} B) "
        f"/ {p.kv_per_token.num_bytes} B = {p.kv_tokens_per_replica:,} tokens",
        f"  {'sequences':<24}{p.kv_tokens_per_replica} / {i.context} = {p.sequences_per_replica} "
        f"sequences of {i.context} tokens",
        "",
        "Expert groups (one GPU each; experts split in contiguous near-equal ranges)",
        f"  {'experts per GPU':<24}floor({p.usable_per_gpu.num_bytes} B / {p.per_expert.num_bytes} B) "
        f"= {p.max_experts_per_gpu}",
        f"  {'smallest G':<24}ceil({c.n_routed_experts} / {p.max_experts_per_gpu}) = {p.smallest_expert_groups}",
    ]
    if i.expert_groups is not None:
        verdict = "fits" if p.expert_groups_fit else (
            f"DOES NOT FIT: {max(p.experts_per_group)} experts > {p.max_experts_per_gpu} per GPU; "
            f"the smallest G that fits is {p.smallest_expert_groups}")
        lines.append(f"  {'--expert-groups':<24}{p.expert_groups}: {verdict}")
    lines += [
        "",
        "Smallest cluster" if i.expert_groups is None else
        f"Cluster with --expert-groups {i.expert_groups}{'' if p.expert_groups_fit else ' (does not fit)'}",
        f"  {'GPUs':<24}{p.attention_gpus} attention + {p.expert_groups} expert groups x 1 = {p.total_gpus}",
        f"  {'nodes':<24}ceil({p.total_gpus} / {i.gpus_per_node}) = {p.nodes}",
    ]
    return "\n".join(lines)


def to_json(p: Plan) -> dict:
    """The figures under stable keys; byte counts are exact integers."""
    i = p.inputs
    return {
        "model": i.model_name, "config_source": i.config.source, "dtype": i.dtype,
        "gpu_memory_bytes": i.gpu_memory_bytes, "gpus_per_node": i.gpus_per_node,
        "memory_utilization": i.memory_utilization, "context": i.context,
        "usable_bytes_per_gpu": p.usable_per_gpu.num_bytes,
        "non_expert_bytes": p.non_expert_bytes,
        "non_expert_breakdown_bytes": {t.key: t.num_bytes for t in p.non_expert},
        "routed_expert_bytes": p.routed_experts.num_bytes,
        "bytes_per_expert": p.per_expert.num_bytes,
        "experts_per_group": list(p.experts_per_group),
        "routed_expert_bytes_per_group": [n * p.per_expert.num_bytes for n in p.experts_per_group],
        "kv_bytes_per_token": p.kv_per_token.num_bytes,
        "attention_gpus_per_replica": p.attention_gpus,
        "attention_need_bytes": p.attention_need.num_bytes,
        "kv_tokens_per_replica": p.kv_tokens_per_replica,
        "sequences_per_replica": p.sequences_per_replica,
        "max_experts_per_gpu": p.max_experts_per_gpu,
        "gpus_per_expert_group": 1,
        "expert_groups": p.expert_groups,
        "expert_groups_fit": p.expert_groups_fit,
        "smallest_expert_groups": p.smallest_expert_groups,
        "total_gpus": p.total_gpus,
        "nodes": p.nodes,
        "formulas": {t.key: t.formula for t in (p.usable_per_gpu, *p.non_expert, p.per_expert, p.routed_experts,
                                                  p.kv_per_token, p.attention_need)},
    }


# ---- command line ------------------------------------------------------------------------------

def parse_memory(text: str) -> int:
    """'141GiB' -> bytes. TiB/GiB/MiB are binary (2^40, 2^30, 2^20); TB/GB/MB decimal (10^12, 10^9, 10^6)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]+)\s*", text)
    unit = next((u for u in UNITS if m and u.lower() == m.group(2).lower()), None)
    if unit is None or float(m.group(1)) <= 0:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a memory size: write a positive number and a unit, e.g. 141GiB or 80GB "
            "(TiB, GiB, MiB are binary: 2^40, 2^30, 2^20 B; TB, GB, MB decimal: 10^12, 10^9, 10^6 B)")
    return int(float(m.group(1)) * UNITS[unit])


def resolve_model(model: str) -> tuple[ModelConfig, str]:
    """A built-in name, a checkpoint directory, or a config.json file -> (config, name to show)."""
    from glm_ray.model.known_configs import KNOWN_CONFIGS, known_config

    path = Path(model)
    try:
        if model.lower() in KNOWN_CONFIGS:
            return known_config(model), model.lower()
        if path.is_dir():
            return load_model_config(path), model
        if path.is_file():
            try:
                raw = json.loads(path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ConfigError(f"{path}: not valid JSON ({e})") from None
            return config_from_dict(raw, source=str(path)), model
    except ConfigError as e:
        raise SystemExit(f"glm-ray: error: --model {model}: {e}") from None
    raise SystemExit(f"glm-ray: error: --model {model}: not a built-in name ({', '.join(KNOWN_CONFIGS)}), "
                     "a directory holding config.json, or a config.json file")


def cmd_plan(args) -> int:
    config, name = resolve_model(args.model)
    if args.context > config.max_position_embeddings:
        raise SystemExit(f"glm-ray: error: --context {args.context} exceeds {name}'s max_position_embeddings "
                         f"{config.max_position_embeddings}")
    if args.expert_groups is not None and args.expert_groups > config.n_routed_experts:
        raise SystemExit(f"glm-ray: error: --expert-groups {args.expert_groups} exceeds {name}'s "
                         f"{config.n_routed_experts} routed experts")
    try:
        plan = make_plan(PlanInputs(config, name, args.gpu_memory, args.gpus_per_node, args.dtype,
                                    args.expert_groups, args.context, args.memory_utilization))
    except PlanError as e:
        raise SystemExit(f"glm-ray: error: {e}") from None
    print(json.dumps(to_json(plan), indent=2) if args.json else render_text(plan))
    return 0 if plan.expert_groups_fit else 1


def add_plan_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "plan", help="size a cluster for a model from its config.json (no weights read)",
        description="GPUs and nodes that serve a GLM-4 MoE model: weight bytes, KV cache per token, GPUs per "
                    "attention replica, the smallest number of expert groups, with the arithmetic shown. "
                    "Exits 1 when a given --expert-groups does not fit.")
    p.add_argument("--model", required=True, metavar="DIR|config.json|NAME",
                   help="a checkpoint directory, a config.json, or a built-in name: glm-4.5, glm-4.5-air, glm-4.6")
    p.add_argument("--gpu-memory", type=parse_memory, required=True, metavar="SIZE",
                   help="memory of one GPU, e.g. 141GiB or 80GB (GiB/MiB/TiB binary, GB/MB/TB decimal)")
    p.add_argument("--gpus-per-node", type=positive_int, required=True, help="GPUs in one node")
    p.add_argument("--dtype", choices=list(WEIGHT_BYTES), default="bfloat16",
                   help="weight dtype of the matmul weights (the KV cache is bf16 either way)")
    p.add_argument("--expert-groups", type=positive_int, default=None,
                   help="check this G instead of picking the smallest that fits")
    p.add_argument("--context", type=positive_int, default=131072,
                   help="tokens of one sequence an attention replica must hold (default 131072)")
    p.add_argument("--memory-utilization", type=number_in(0, 1, low_open=True), default=0.9,
                   help="share of each GPU's memory for weights and KV cache (default 0.9)")
    p.add_argument("--json", action="store_true", help="print the figures as a JSON object")
    p.set_defaults(func=cmd_plan)
    return p
