"""The engine: requests in, token deltas out, one `step()` at a time.

`step()` is schedule -> run -> postprocess. It owns the paged KV cache, scheduler, model and
sampler; routed experts come from whichever `ExpertBackend` it is given (in-process by default).
"""

from __future__ import annotations

import time
from collections import deque
from contextlib import contextmanager
from pathlib import Path

import torch

from glm_ray.config import load_model_config
from glm_ray.device import resolve_device
from glm_ray.engine import decode_attention
from glm_ray.engine.attention_workers import AttentionWorkers, share_projections
from glm_ray.engine.config import EngineLimits, EngineOptions
from glm_ray.engine.kv_cache import PagedKVCache, kv_bytes_per_token
from glm_ray.engine.memory import retain_freed_memory
from glm_ray.engine.model_runner import ModelRunner
from glm_ray.engine.outputs import RequestDelta
from glm_ray.engine.request import Request, Resume
from glm_ray.engine.sampler import Sampler, prompt_logprobs
from glm_ray.engine.sampling_params import SamplingParams
from glm_ray.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from glm_ray.experts.backend import ExpertBackend
from glm_ray.model.loader import load_model, resolve_dtype
from glm_ray.tokenizer import Tokenizer


class LLMEngine:
    def __init__(self, model: str | Path, options: EngineOptions | None = None, experts: ExpertBackend | None = None):
        self.model_dir = Path(model)
        self.options = options or EngineOptions()
        if self.options.retain_freed_memory:
            retain_freed_memory()
        self.model_config = load_model_config(self.model_dir)
        self.device = resolve_device(self.options.device)
        self.dtype = resolve_dtype(self.options.dtype, self.model_config, device=self.device)
        self.tokenizer = Tokenizer.from_pretrained(self.model_dir)
        self.model, local, _ = load_model(self.model_dir, dtype=self.dtype, with_experts=experts is None,
                                          device=self.device, expert_backend=self.options.expert_backend,
                                          kernel_threads=self.options.kernel_threads)
        self.experts = experts or local
        self.limits = EngineLimits.resolve(self.options, self.model_config,
                                           kv_bytes_per_token(self.model_config, self.dtype))
        o = self.options
        self.scheduler = Scheduler(SchedulerConfig(
            o.max_num_seqs, o.max_num_batched_tokens, o.block_size, self.limits.num_kv_blocks,
            o.enable_prefix_caching, o.long_prefill_token_threshold))
        decode_kernel = o.decode_attention == "cpu-kernel"
        if decode_kernel:
            reason = decode_attention.unusable_reason(self.model_config, self.dtype, self.device)
            if reason:
                raise ValueError(f"decode_attention cpu-kernel cannot run here: {reason}")
        self.cache = PagedKVCache(self.model_config, self.limits.num_kv_blocks, o.block_size, self.dtype, self.device,
                                  decode_kernel=decode_kernel, kernel_threads=o.kernel_threads)
        sampler = Sampler(self.model_config.eos_token_ids, torch.Generator(self.device).manual_seed(o.seed))
        workers = None
        if o.attention_workers > 1:
            workers = AttentionWorkers(o.attention_workers)
            share_projections(self.model, workers)
        self.runner = ModelRunner(self.model, self.experts, self.cache, sampler, o.microbatches, workers)
        self.requests: dict[str, Request] = {}
        self.step_stats = {"steps": 0, "step_s": 0.0, "batched_tokens": 0}  # cumulative, for benchmarks
        # (monotonic end, seconds, batched tokens) of recent steps
        self.step_times: deque[tuple[float, float, int]] = deque(maxlen=8192)

    # --- requests -------------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    prompt: str | None = None, resume: Resume | None = None) -> Request:
        """`resume`: continue a request another engine started (engine/request.py, Resume)."""
        self.validate(prompt_token_ids, params, resume)
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already running")
        req = Request(request_id, prompt_token_ids, params, self.tokenizer, self.model_config.eos_token_ids, prompt,
                      device=self.device, resume=resume)
        self.scheduler.add(req.seq)
        self.requests[request_id] = req
        return req

    def validate(self, prompt_token_ids: list[int], params: SamplingParams, resume: Resume | None = None) -> None:
        """Raise ValueError naming the limit a request breaks."""
        if not prompt_token_ids:
            raise ValueError("the prompt is empty: pass at least one token")
        vocab = self.model_config.vocab_size
        bad = [t for t in prompt_token_ids if not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token id {bad[0]!r} is outside the vocabulary [0, {vocab})")
        if params.max_tokens > self.limits.max_output_tokens:
            raise ValueError(f"max_tokens {params.max_tokens} exceeds the output limit "
                             f"{self.limits.max_output_tokens}")
        total = len(prompt_token_ids) + params.max_tokens
        if total > self.limits.max_model_len:
            raise ValueError(f"prompt ({len(prompt_token_ids)} tokens) + max_tokens ({params.max_tokens}) = {total} "
                             f"exceeds max_model_len {self.limits.max_model_len}")
        if resume is not None:
            if len(resume.token_ids) >= params.max_tokens:
                raise ValueError(f"resume: {len(resume.token_ids)} tokens already generated leave none of "
                                 f"max_tokens {params.max_tokens}")
            bad = [t for t in resume.token_ids if not 0 <= t < vocab]
            if bad:
                raise ValueError(f"resume token id {bad[0]!r} is outside the vocabulary [0, {vocab})")

    def abort(self, request_id: str) -> bool:
        req = self.requests.pop(request_id, None)
        if req is None:
            return False
        self.scheduler.abort(request_id)
        req.finish("abort")
        return True

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def running_request_ids(self) -> list[str]:
        """Requests admitted to the running batch (holding KV blocks), not those still queued."""
        return [seq.seq_id for seq in self.scheduler.running if seq.seq_id in self.requests]

    # --- one step -------------------------------------------------------------------------------

    def step(self) -> list[RequestDelta]:
        start = time.perf_counter()
        out = self.scheduler.schedule()
        with _torch_threads(self.options.wide_step_threads if out.num_batched_tokens >= WIDE_STEP_TOKENS else None):
            result = self.runner.run(out.chunks, self.requests) if out.chunks else None
        self.scheduler.finish_step(out)
        deltas = self._postprocess(out, result)
        elapsed = time.perf_counter() - start
        self.step_stats["steps"] += 1
        self.step_stats["step_s"] += elapsed
        self.step_times.append((time.monotonic(), elapsed, out.num_batched_tokens))
        self.step_stats["batched_tokens"] += out.num_batched_tokens
        return deltas

    def _postprocess(self, out: SchedulerOutput, result) -> list[RequestDelta]:
        deltas = []
        now = time.monotonic()
        for seq_id in out.preempted_seq_ids:  # recompute restarts the prompt from position 0
            if seq_id in self.requests:
                self.requests[seq_id].prompt_logprob_rows = []
        for chunk in out.chunks:
            req = self.requests.get(chunk.seq.seq_id)
            if req is None:
                continue
            if req.metrics.first_scheduled_time is None:
                req.metrics.first_scheduled_time = now
                req.metrics.num_cached_tokens = chunk.start
            prompt_lp = self._prompt_logprobs(req, result.prompt_logits.get(req.request_id), chunk)
            if not chunk.sample:
                if prompt_lp is not None:
                    deltas.append(req.delta([], None, prompt_lp))
                continue
            token = result.sampled[req.request_id]
            length_done = self.scheduler.append_token(chunk.seq, token)
            delta = req.add_token(token, result.logprobs[req.request_id], length_done)
            delta.prompt_logprobs = prompt_lp
            if req.finish_reason is not None:
                delta.metrics = req.metrics
                if not length_done:
                    self.scheduler.finish(req.request_id, req.finish_reason)
                del self.requests[req.request_id]
            deltas.append(delta)
        return deltas

    @staticmethod
    def _prompt_logprobs(req: Request, logits, chunk):
        """Collect prompt-position logits chunk by chunk; convert once the prompt is complete."""
        if logits is None:
            return None
        req.prompt_logprob_rows.append(logits)
        if chunk.end < chunk.seq.num_prompt_tokens:
            return None
        rows = torch.cat(req.prompt_logprob_rows)
        req.prompt_logprob_rows = []
        req.prompt_logprobs = prompt_logprobs(rows, req.prompt_token_ids, req.sampling_params.prompt_logprobs)
        for entry in req.prompt_logprobs[1:]:
            for tid, lp in entry.items():
                lp.decoded_token = req.tokenizer.decode([tid], skip_special_tokens=False)
        return req.prompt_logprobs


WIDE_STEP_TOKENS = 256  # a step this wide (prefill) runs on `wide_step_threads`


@contextmanager
def _torch_threads(n: int | None):
    """torch's intra-op threads set to n for the block (None: left as they are). torch's CPU ops
    gave the same bits on 1 and 2 threads, fp32 and bf16 (tests/engine), each output being one
    thread's; MKL and oneDNN do not promise it."""
    before = torch.get_num_threads()
    if n is None or n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
