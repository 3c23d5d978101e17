"""What the engine hands back, in the shapes vLLM users know."""

from __future__ import annotations

from dataclasses import dataclass, field

from glm_ray.engine.sampler import Logprob

TokenLogprobs = dict[int, Logprob]


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    token_times: list[float] = field(default_factory=list)  # when each output token was produced
    num_cached_tokens: int = 0  # prompt tokens taken from the prefix cache


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[TokenLogprobs] | None
    finish_reason: str | None = None  # "stop", "length", "abort"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: list[TokenLogprobs | None] | None
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics


@dataclass
class RequestDelta:
    """What one step added to one request: the unit of streaming."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    new_logprobs: list[TokenLogprobs] | None
    finish_reason: str | None
    stop_reason: int | str | None
    num_prompt_tokens: int
    num_output_tokens: int
    prompt_logprobs: list[TokenLogprobs | None] | None = None  # on the delta that completes the prompt
    metrics: RequestMetrics | None = None  # on the delta that finishes the request

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def then(self, later: RequestDelta) -> RequestDelta:
        """This delta followed by `later` (of the same request), as one."""
        return RequestDelta.concat([self, later])

    @staticmethod
    def concat(deltas: list[RequestDelta]) -> RequestDelta:
        """Consecutive deltas of one request as one, in time linear in their total size."""
        first, last = deltas[0], deltas[-1]
        token_ids = [t for d in deltas for t in d.new_token_ids]
        text = "".join(d.new_text for d in deltas)
        logprobs = None
        if any(d.new_logprobs is not None for d in deltas):
            logprobs = [lp for d in deltas for lp in (d.new_logprobs or [])]
        prompt_logprobs = next((d.prompt_logprobs for d in deltas if d.prompt_logprobs), None)
        metrics = next((d.metrics for d in reversed(deltas) if d.metrics is not None), None)
        return RequestDelta(first.request_id, token_ids, text, logprobs, last.finish_reason, last.stop_reason,
                            last.num_prompt_tokens, last.num_output_tokens, prompt_logprobs, metrics)
