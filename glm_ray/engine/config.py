"""Engine options, validated once into a frozen, resolved object.

Limits come from the model config and these options, never from constants in the code paths:
`max_model_len` defaults to the checkpoint's `max_position_embeddings` (GLM-4.6: 202752) and
`max_output_tokens` to GLM-4.6's 128K output ceiling (glm-spec §5).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from glm_ray.config import ModelConfig
from glm_ray.device import check_device

GLM46_MAX_OUTPUT_TOKENS = 131072
DECODE_ATTENTION = ("torch", "cpu-kernel")


@dataclass(frozen=True)
class EngineOptions:
    """What a user may pass as `LLM(model, **options)`; unknown names are an error."""

    dtype: str = "auto"  # auto (the checkpoint's), float32, bfloat16
    device: str = "auto"  # auto (CUDA where torch sees it), cpu, cuda, cuda:N (glm_ray/device.py)
    expert_backend: str = "auto"  # routed-expert compute: auto, cpu-kernel, torch, deepspeed (experts/compute.py)
    # decode attention: torch (its SDPA, as transformers: exact), cpu-kernel (a C kernel reading the paged
    # cache in place, fp32 on x86 CPUs: faster, equal to torch to fp32 rounding only; engine/decode_attention.py)
    decode_attention: str = "torch"
    max_num_seqs: int = 64  # sequences running at once
    max_waiting_requests: int | None = None  # queued beyond those, else EngineFullError (async engine); None: no limit
    max_num_batched_tokens: int = 2048  # tokens computed in one step
    max_model_len: int | None = None  # prompt + output positions; None = the model's maximum
    max_output_tokens: int | None = None  # ceiling on max_tokens; None = min(128K, max_model_len)
    kv_cache_memory: int = 1 << 30  # bytes of KV cache (ignored when num_kv_blocks is given)
    num_kv_blocks: int | None = None  # KV cache size in blocks, overriding kv_cache_memory
    block_size: int = 16  # positions per KV block
    enable_prefix_caching: bool = True
    long_prefill_token_threshold: int | None = None  # cap on one prompt's tokens per step
    seed: int = 0  # seeds the generator of unseeded sampling requests
    retain_freed_memory: bool = True  # keep large freed blocks in this process's heap (engine/memory.py)
    microbatches: int = 1  # >1: a step's sequences in groups run interleaved (remote experts overlap)
    attention_workers: int = 1  # >1: threads sharing each layer's attention calls (engine/attention_workers.py)
    # threads of the C kernels (routed experts, decode attention), which take their work items as threads get
    # free; None: torch's intra-op threads. A server keeping torch a core short for its front end gives them
    # every core (serving/attention.py)
    kernel_threads: int | None = None
    # torch's threads in a step of at least WIDE_STEP_TOKENS tokens (prefill; engine/llm_engine.py); None: torch's
    # setting. Ops that large lose little to a thread preempted at a barrier, so a server that keeps torch a core
    # short for its front end gives them every core
    wide_step_threads: int | None = None

    @classmethod
    def from_kwargs(cls, **kwargs) -> EngineOptions:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ValueError(f"unknown engine option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**kwargs)

    def __post_init__(self):
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        check_device(self.device)
        from glm_ray.experts.compute import check_backend

        check_backend(self.expert_backend)
        if self.decode_attention not in DECODE_ATTENTION:
            raise ValueError(f"decode_attention must be one of {', '.join(DECODE_ATTENTION)}, got {self.decode_attention!r}")
        for name in ("max_num_seqs", "max_num_batched_tokens", "kv_cache_memory", "block_size", "microbatches",
                     "attention_workers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("max_model_len", "max_output_tokens", "num_kv_blocks", "long_prefill_token_threshold",
                     "max_waiting_requests", "kernel_threads", "wide_step_threads"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be None or an integer >= 1, got {value!r}")
        if self.wide_step_threads is not None and self.attention_workers > 1:
            # the workers share a wide step already, and a helper first used in one would keep its threads
            raise ValueError(f"wide_step_threads ({self.wide_step_threads}) cannot be combined with attention_workers "
                             f"> 1 ({self.attention_workers})")
        if not isinstance(self.enable_prefix_caching, bool):
            raise ValueError(f"enable_prefix_caching must be true or false, got {self.enable_prefix_caching!r}")


@dataclass(frozen=True)
class EngineLimits:
    """Options resolved against a model: what the engine actually enforces."""

    max_model_len: int
    max_output_tokens: int
    num_kv_blocks: int
    block_size: int

    @classmethod
    def resolve(cls, options: EngineOptions, model: ModelConfig, kv_bytes_per_token: int) -> EngineLimits:
        max_model_len = options.max_model_len or model.max_position_embeddings
        if max_model_len > model.max_position_embeddings:
            raise ValueError(f"max_model_len {max_model_len} exceeds the model's max_position_embeddings "
                             f"{model.max_position_embeddings}")
        max_output = options.max_output_tokens or min(GLM46_MAX_OUTPUT_TOKENS, max_model_len)
        blocks = options.num_kv_blocks or options.kv_cache_memory // (kv_bytes_per_token * options.block_size)
        if blocks < 1:
            raise ValueError(f"kv_cache_memory {options.kv_cache_memory} bytes holds no block of "
                             f"{options.block_size} tokens at {kv_bytes_per_token} bytes per token")
        return cls(max_model_len, max_output, blocks, options.block_size)
