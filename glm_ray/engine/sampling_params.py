"""Per-request sampling parameters, with vLLM's names, defaults and meaning.

Every value is checked where it enters: a bad one raises ValueError naming the field,
the value given and the range allowed, so an API layer can hand the message to the user.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

# Temperatures below this are treated as greedy decoding (vLLM's _SAMPLING_EPS).
GREEDY_TEMPERATURE_EPS = 1e-5


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_number(name: str, value, low: float, high: float, *,
                  low_open: bool = False, high_open: bool = False) -> None:
    """Raise unless `value` is a finite number inside the interval from low to high."""
    left = "(" if low_open else "["
    right = ")" if high_open or high == math.inf else "]"
    allowed = f"a number in {left}{low}, {'inf' if high == math.inf else high}{right}"
    ok = _is_number(value) and not math.isnan(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (
            value < high if high_open else value <= high)
    if not ok:
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


def _check_int(name: str, value, low: int, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not _is_int(value) or value < low:
        none = " or None" if allow_none else ""
        raise ValueError(f"{name} must be an integer >= {low}{none}, got {value!r}")


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token of one request and when to stop.

    Fields follow vLLM's `SamplingParams`; see the comment on each for its meaning.
    """

    temperature: float = 1.0  # divides logits; < 1e-5 means greedy (argmax)
    top_p: float = 1.0  # keep the smallest set of tokens whose probability sums to >= top_p
    top_k: int = 0  # keep the k most likely tokens; 0 or -1 keeps all
    min_p: float = 0.0  # drop tokens less likely than min_p * p(most likely token)
    repetition_penalty: float = 1.0  # HF: > 1 discourages tokens seen in prompt or output
    presence_penalty: float = 0.0  # OpenAI: subtract once from tokens already generated
    frequency_penalty: float = 0.0  # OpenAI: subtract per occurrence in generated tokens
    seed: int | None = None  # per-request RNG seed; same seed, same draws
    max_tokens: int = 16  # at most this many generated tokens (finish_reason "length")
    min_tokens: int = 0  # EOS, stop ids and stop strings cannot end the output before this
    stop: list[str] = field(default_factory=list)  # output ends before any of these strings
    stop_token_ids: list[int] = field(default_factory=list)  # output ends on any of these ids
    ignore_eos: bool = False  # keep generating past EOS
    logprobs: int | None = None  # return this many top logprobs per token (+ the sampled one)
    prompt_logprobs: int | None = None  # the same for every prompt token
    skip_special_tokens: bool = True  # leave special tokens out of the output text

    def __post_init__(self) -> None:
        # Normalise first (frozen: go through object.__setattr__), then validate.
        # Lists are copied so a caller mutating its own list cannot change a live request.
        stop = [] if self.stop is None else self.stop
        stop = [stop] if isinstance(stop, str) else stop
        stop_token_ids = [] if self.stop_token_ids is None else self.stop_token_ids
        if isinstance(stop, (list, tuple)):
            object.__setattr__(self, "stop", list(stop))
        if isinstance(stop_token_ids, (list, tuple)):
            object.__setattr__(self, "stop_token_ids", list(stop_token_ids))
        self._validate()

    def _validate(self) -> None:
        _check_number("temperature", self.temperature, 0.0, math.inf)
        _check_number("top_p", self.top_p, 0.0, 1.0, low_open=True)
        if not _is_int(self.top_k) or self.top_k < -1:
            raise ValueError(
                f"top_k must be an integer >= 1, or 0 or -1 to disable, got {self.top_k!r}")
        _check_number("min_p", self.min_p, 0.0, 1.0)
        _check_number("repetition_penalty", self.repetition_penalty, 0.0, math.inf,
                      low_open=True)
        _check_number("presence_penalty", self.presence_penalty, -2.0, 2.0)
        _check_number("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        if self.seed is not None and not _is_int(self.seed):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")
        _check_int("max_tokens", self.max_tokens, 1)
        _check_int("min_tokens", self.min_tokens, 0)
        if self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens must be <= max_tokens ({self.max_tokens}), got {self.min_tokens!r}")
        if not isinstance(self.stop, list) or not all(isinstance(s, str) for s in self.stop):
            raise ValueError(f"stop must be a string or a list of strings, got {self.stop!r}")
        if any(s == "" for s in self.stop):
            raise ValueError(f"stop must not contain an empty string, got {self.stop!r}")
        if not isinstance(self.stop_token_ids, list) or not all(
                _is_int(t) and t >= 0 for t in self.stop_token_ids):
            raise ValueError(
                f"stop_token_ids must be a list of integers >= 0, got {self.stop_token_ids!r}")
        for name in ("ignore_eos", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        _check_int("logprobs", self.logprobs, 0, allow_none=True)
        _check_int("prompt_logprobs", self.prompt_logprobs, 0, allow_none=True)

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE_EPS
