"""Streaming detokenization: turn one new token id at a time into newly completed text.

Byte-level BPE splits multi-byte characters (emoji, CJK) across tokens, so decoding a token on its
own can end in half a character, which decodes as U+FFFD. We decode only a short window of recent
ids, in the spirit of vLLM's prefix/read offsets:

    ids:  ... | prefix_offset ........ read_offset ........ len(ids)
                 already emitted text   (context only)      not yet emitted

`decode(ids[prefix_offset:])` minus `decode(ids[prefix_offset:read_offset])` is the new text; it is held
back while it ends in U+FFFD (a character still incomplete), and the window then slides forward.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

REPLACEMENT_CHAR = "\ufffd"
# Prompt tokens kept as decode context, so decoders that depend on the previous token see it.
NUM_CONTEXT_TOKENS = 5


class _Decoder(Protocol):
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...


class IncrementalDetokenizer:
    """Per-sequence streaming decoder.

    The concatenation of every `add()` result and a final `flush()` equals
    `tokenizer.decode(output_ids, skip_special_tokens=...)`. Each `add()` decodes only the ids since
    the last emitted text plus the previous emitted piece, so its cost does not grow with length.
    """

    def __init__(
        self, tokenizer: _Decoder, prompt_token_ids: Sequence[int], skip_special_tokens: bool = True
    ) -> None:
        self._tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        context = list(prompt_token_ids[-NUM_CONTEXT_TOKENS:])
        if self._decode(context).endswith(REPLACEMENT_CHAR):
            # The prompt ends mid-character; completing it with output bytes would emit text that
            # decoding the output alone does not produce, so start without context.
            context = []
        self._ids: list[int] = context
        self._num_context = len(context)
        self._prefix_offset = 0
        self._read_offset = len(context)

    @property
    def output_token_ids(self) -> list[int]:
        return self._ids[self._num_context:]

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token_id: int) -> str:
        """Append one generated token id; return the text it completes ("" while a character is split)."""
        self._ids.append(token_id)
        prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset:])
        if len(new_text) <= len(prefix_text) or new_text.endswith(REPLACEMENT_CHAR):
            return ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return new_text[len(prefix_text):]

    def flush(self) -> str:
        """Text held back at the end of the sequence (an incomplete character decodes as U+FFFD)."""
        prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset:])
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return new_text[len(prefix_text):]
