"""One request's state inside the engine: its scheduler sequence, sampling state, text and stats."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from glm_ray.engine.outputs import CompletionOutput, RequestDelta, RequestMetrics, RequestOutput, TokenLogprobs
from glm_ray.engine.sampler import make_generator
from glm_ray.engine.sampling_params import SamplingParams
from glm_ray.engine.sequence import Sequence
from glm_ray.engine.stop import check_stop, num_held_back_chars
from glm_ray.tokenizer import IncrementalDetokenizer


@dataclass(frozen=True)
class Resume:
    """A request continued on this engine after the one generating it was lost
    (serving/attention_links.py): the output tokens its client already has, and how many
    characters of text those made there. The engine computes prompt + these tokens in its first
    step and goes on from the next position, so outputs continue as if nothing happened: greedy
    exactly, seeded sampling too (draws depend on the seed and the position, engine/sampler.py).
    Prompt logprobs, sent with the first token, are not sent again; logprobs and the cumulative
    logprob cover the new tokens."""

    token_ids: tuple[int, ...]
    num_sent_chars: int

    @classmethod
    def from_dict(cls, data: dict) -> Resume:
        ids, sent = data.get("token_ids"), data.get("num_sent_chars")
        if not isinstance(ids, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise ValueError(f"resume.token_ids must be a list of integers, got {ids!r}")
        if not isinstance(sent, int) or isinstance(sent, bool) or sent < 0:
            raise ValueError(f"resume.num_sent_chars must be an integer >= 0, got {sent!r}")
        return cls(tuple(ids), sent)


class Request:
    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, tokenizer,
                 eos_token_ids, prompt: str | None = None, device: torch.device | str = "cpu",
                 resume: Resume | None = None):
        self.request_id = request_id
        self.prompt = prompt
        self.sampling_params = params
        self.seq = Sequence(request_id, prompt_token_ids, params.max_tokens, sampling_params=params)
        # prompt logprobs need logits for every prompt position: no prefix-cache shortcut
        self.seq.cache_prefix = params.prompt_logprobs is None
        self.generator: torch.Generator | None = make_generator(params.seed, device)
        self.detokenizer = IncrementalDetokenizer(tokenizer, prompt_token_ids, params.skip_special_tokens)
        self.tokenizer = tokenizer
        self.eos_token_ids = set(eos_token_ids)
        self.text = ""
        self.num_sent_chars = 0
        self.logprobs: list[TokenLogprobs] | None = [] if params.logprobs is not None else None
        self.cumulative_logprob = 0.0 if params.logprobs is not None else None
        self.prompt_logprob_rows: list[torch.Tensor] = []  # fp32 logits rows for prompt positions
        self.prompt_logprobs: list[TokenLogprobs | None] | None = None
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.metrics = RequestMetrics(arrival_time=time.monotonic())
        self.resumed = resume is not None
        if resume is not None:
            self.seq.cache_prefix = True
            self.seq.token_ids.extend(resume.token_ids)  # outputs, computed again with the prompt
            for token_id in resume.token_ids:
                self.text += self.detokenizer.add(token_id)
            self.num_sent_chars = min(resume.num_sent_chars, len(self.text))

    # the sampler's view (SamplingRow)
    @property
    def prompt_token_ids(self) -> list[int]:
        return self.seq.prompt_token_ids

    @property
    def output_token_ids(self) -> list[int]:
        return self.seq.completion_token_ids

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.sampling_params.prompt_logprobs is not None and self.prompt_logprobs is None and not self.resumed

    def add_token(self, token_id: int, logprobs: TokenLogprobs | None, length_finished: bool) -> RequestDelta:
        """Record a sampled token (already appended to the sequence) and decide whether to stop."""
        now = time.monotonic()
        if self.metrics.first_token_time is None:
            self.metrics.first_token_time = now
        self.metrics.token_times.append(now)
        if self.logprobs is not None and logprobs is not None:
            for tid, lp in logprobs.items():
                lp.decoded_token = self.tokenizer.decode([tid], skip_special_tokens=False)
            self.logprobs.append(logprobs)
            self.cumulative_logprob += logprobs[token_id].logprob
        text_before = self.text
        new_chars = self.detokenizer.add(token_id)
        self.text += new_chars
        decision = check_stop(self.output_token_ids, self.text, self.sampling_params, self.eos_token_ids,
                              len(new_chars))
        if decision.finish_reason == "stop":
            # a stop string is cut off; an EOS or stop token contributes no text (as vLLM)
            self.text = decision.output_text if isinstance(decision.stop_reason, str) else text_before
            self.finish("stop", decision.stop_reason)
        elif decision.finished or length_finished:
            self.text += self.detokenizer.flush()
            self.finish("length")
        return self.delta([token_id], [logprobs] if self.logprobs is not None else None)

    def finish(self, reason: str, stop_reason: int | str | None = None) -> None:
        self.finish_reason, self.stop_reason = reason, stop_reason
        self.metrics.finished_time = time.monotonic()

    def delta(self, token_ids: list[int], logprobs: list[TokenLogprobs] | None,
              prompt_logprobs: list | None = None) -> RequestDelta:
        """Text safe to stream now: everything when finished, else all but a possible stop-string start."""
        stop = self.sampling_params.stop
        end = len(self.text) if self.finish_reason or not stop else len(self.text) - num_held_back_chars(self.text, stop)
        new_text = self.text[self.num_sent_chars:end]
        self.num_sent_chars = max(self.num_sent_chars, end)
        return RequestDelta(self.request_id, token_ids, new_text, logprobs, self.finish_reason, self.stop_reason,
                            self.seq.num_prompt_tokens, self.seq.num_completion_tokens, prompt_logprobs)

    def output(self) -> RequestOutput:
        completion = CompletionOutput(0, self.text, list(self.output_token_ids), self.cumulative_logprob,
                                      self.logprobs, self.finish_reason, self.stop_reason)
        return RequestOutput(self.request_id, self.prompt, list(self.prompt_token_ids), self.prompt_logprobs,
                             [completion], self.finish_reason is not None, self.metrics)
