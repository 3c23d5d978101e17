"""When does one sequence stop, and how much of its text may be streamed yet.

Plain functions over token ids and detokenized text; no torch. Called once per new token,
after the token is appended to the output and the output text is updated.

Finish reasons follow vLLM/OpenAI: "stop" for EOS, a stop token id or a stop string;
"length" for max_tokens. A stop condition met on the last allowed token reports "stop".
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Collection, Sequence

from glm_ray.engine.sampling_params import SamplingParams


@dataclass(frozen=True)
class StopDecision:
    """The outcome of one check. finish_reason None means: keep generating."""

    finish_reason: str | None  # "stop", "length" or None
    output_text: str  # the text to report; cut before the stop string when one matched
    stop_reason: int | str | None = None  # the stop token id or stop string that matched

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


def find_stop_string(output_text: str, stop: Sequence[str],
                     num_new_chars: int | None = None) -> tuple[int, str] | None:
    """Earliest (position, stop string) in output_text, or None.

    num_new_chars: how many characters the last token added. Only matches that end in
    those characters are new, so only the tail that could hold one is searched; None
    searches everything. A match may start in text from earlier tokens.
    """
    best: tuple[int, str] | None = None
    for s in stop:
        start = 0
        if num_new_chars is not None:
            start = max(0, len(output_text) - num_new_chars - len(s) + 1)
        pos = output_text.find(s, start)
        if pos != -1 and (best is None or pos < best[0]):
            best = (pos, s)
    return best


def num_held_back_chars(output_text: str, stop: Sequence[str]) -> int:
    """How many trailing characters might be the start of a stop string.

    Streaming must not send these yet: if the next tokens complete the stop string, the
    text from its first character on is cut from the output.
    """
    held = 0
    for s in stop:
        # Longest proper prefix of s that output_text ends with.
        for n in range(min(len(s) - 1, len(output_text)), held, -1):
            if output_text.endswith(s[:n]):
                held = n
                break
    return held


def streamable_text(output_text: str, stop: Sequence[str], finished: bool) -> str:
    """The part of output_text that is safe to send to a streaming client now."""
    if finished or not stop:
        return output_text
    return output_text[:len(output_text) - num_held_back_chars(output_text, stop)]


def check_stop(output_token_ids: Sequence[int], output_text: str, params: SamplingParams,
               eos_token_ids: Collection[int], num_new_chars: int | None = None) -> StopDecision:
    """Decide whether a sequence is done after its newest token (output_token_ids[-1]).

    output_text: the detokenized output so far, including the newest token's text.
    num_new_chars: how many characters that token added (limits the stop-string search).
    """
    num_tokens = len(output_token_ids)
    if num_tokens == 0:
        return StopDecision(None, output_text)
    # Before min_tokens nothing but the length limit ends the sequence (vLLM does the same).
    if num_tokens >= params.min_tokens:
        last = output_token_ids[-1]
        if not params.ignore_eos and last in eos_token_ids:
            return StopDecision("stop", output_text)
        if last in params.stop_token_ids:
            return StopDecision("stop", output_text, stop_reason=last)
        if params.stop:
            match = find_stop_string(output_text, params.stop, num_new_chars)
            if match is not None:
                pos, s = match
                return StopDecision("stop", output_text[:pos], stop_reason=s)
    if num_tokens >= params.max_tokens:
        return StopDecision("length", output_text)
    return StopDecision(None, output_text)
