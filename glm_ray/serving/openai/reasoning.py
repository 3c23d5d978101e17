"""Split GLM-4.5/4.6 output into reasoning (`<think>...</think>`) and content.

GLM-4.6 thinks by default: the generation prompt ends with `<|assistant|>` and the output starts with
`<think>`. With `enable_thinking=False` the prompt ends with `<think></think>` (`thinking_enabled` tells
which) and the whole output is content. Rules shared by `split` and `ReasoningStream`:

- Reasoning is recognised only when `<think>` is the first non-whitespace text of the output;
  otherwise (or when thinking is off) everything is content, tags included.
- Reasoning runs to the first `</think>`. If the output is cut before it (max_tokens), everything
  after `<think>` is reasoning. Tags inside reasoning are not parsed.
- Trimming, because GLM writes `<think>\\n...\\n</think>\\n`: newlines (only `\\n`) are dropped at both
  ends of the reasoning and at the start of the content; all other whitespace is kept.
- An empty field is None from `split` and "" in stream deltas.

The stream holds back text that may still turn into a tag (`<thi`, `</thin`) and newlines that may
turn out to be trailing; `finish()` flushes what never became a tag as the text it is, so the streamed
deltas always concatenate to `split` of the whole output.
"""

from __future__ import annotations

from typing import NamedTuple

THINK_START = "<think>"
THINK_END = "</think>"

_START, _REASONING, _CONTENT = "start", "reasoning", "content"


class ReasoningDelta(NamedTuple):
    """What one `feed`/`finish` call adds to each field ("" when nothing)."""

    reasoning: str = ""
    content: str = ""


def thinking_enabled(prompt: str) -> bool:
    """False when the rendered prompt already closed an empty think block (enable_thinking=False)."""
    return not prompt.rstrip().endswith(THINK_START + THINK_END)


def split(text: str, enabled: bool = True) -> tuple[str | None, str | None]:
    """Split a whole completion into (reasoning, content); the plain reference for the stream."""
    reasoning, content = None, text
    body = text.lstrip()
    if enabled and body.startswith(THINK_START):
        reasoning, _, content = body[len(THINK_START):].partition(THINK_END)
        reasoning = reasoning.strip("\n")
    return reasoning or None, content.lstrip("\n") or None


def partial_tag_len(text: str, tags: tuple[str, ...]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of one of `tags`."""
    for n in range(min(len(text), max(map(len, tags)) - 1), 0, -1):
        tail = text[-n:]
        if any(tag.startswith(tail) for tag in tags):
            return n
    return 0


class ReasoningStream:
    """Incremental `split`: feed detokenized deltas, get (reasoning, content) deltas back."""

    def __init__(self, enabled: bool = True):
        self._state = _START if enabled else _CONTENT
        self._pending = ""  # text received but not yet assigned to a field
        self._reasoning_started = False
        self._content_started = False

    def feed(self, delta_text: str) -> ReasoningDelta:
        self._pending += delta_text
        reasoning, content = [], []
        while True:
            if self._state == _START:
                body = self._pending.lstrip()
                if body.startswith(THINK_START):
                    self._pending = body[len(THINK_START):]
                    self._state = _REASONING
                    continue
                if THINK_START.startswith(body):  # only whitespace or a partial `<think>` so far
                    break
                self._state = _CONTENT
                continue
            if self._state == _REASONING:
                end = self._pending.find(THINK_END)
                if end >= 0:
                    reasoning.append(self._reasoning(self._pending[:end].rstrip("\n")))
                    self._pending = self._pending[end + len(THINK_END):]
                    self._state = _CONTENT
                    continue
                ready = self._pending[:len(self._pending) - partial_tag_len(self._pending, (THINK_END,))]
                ready = ready.rstrip("\n")  # may be the newline before `</think>`
                reasoning.append(self._reasoning(ready))
                self._pending = self._pending[len(ready):]
                break
            content.append(self._content(self._pending))
            self._pending = ""
            break
        return ReasoningDelta("".join(reasoning), "".join(content))

    def finish(self) -> ReasoningDelta:
        """End of output: whatever was held back is text, in the field it was heading for."""
        pending, self._pending = self._pending, ""
        if self._state == _REASONING:
            return ReasoningDelta(reasoning=self._reasoning(pending.rstrip("\n")))
        self._state = _CONTENT
        return ReasoningDelta(content=self._content(pending))

    def _reasoning(self, text: str) -> str:
        if not self._reasoning_started:
            text = text.lstrip("\n")
            self._reasoning_started = bool(text)
        return text

    def _content(self, text: str) -> str:
        if not self._content_started:
            text = text.lstrip("\n")
            self._content_started = bool(text)
        return text
