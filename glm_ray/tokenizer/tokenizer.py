"""Tokenizer: a thin wrapper over a HF `tokenizers` tokenizer.json plus the model's chat template."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as BackendTokenizer

from glm_ray.tokenizer.chat_template import (
    TOKENIZER_CONFIG_FILE,
    find_chat_template,
    missing_template_message,
    render_chat_template,
)

TOKENIZER_FILE = "tokenizer.json"


def _token_content(value: Any) -> str | None:
    # tokenizer_config.json stores special tokens either as strings or as AddedToken dicts.
    if isinstance(value, Mapping):
        return value.get("content")
    return value if isinstance(value, str) else None


class Tokenizer:
    """Encode/decode text and render chat prompts for one model.

    `encode` never adds special tokens: GLM's chat template writes `[gMASK]<sop>` itself.
    """

    def __init__(
        self,
        backend: BackendTokenizer,
        chat_template: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        model_dir: str | Path | None = None,
    ) -> None:
        self._backend = backend
        self.chat_template = chat_template
        self.eos_token = eos_token
        self.pad_token = pad_token
        self.model_dir = model_dir
        self.special_token_ids: set[int] = {
            token_id for token_id, token in backend.get_added_tokens_decoder().items() if token.special
        }

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> Tokenizer:
        """Load `tokenizer.json`, and the chat template and eos/pad tokens if the model has them."""
        model_dir = Path(model_dir)
        tokenizer_file = model_dir / TOKENIZER_FILE
        if not tokenizer_file.is_file():
            raise FileNotFoundError(
                f"{tokenizer_file} not found: the model directory must contain a HF tokenizers "
                f"{TOKENIZER_FILE} (glm_ray.tokenizer.write_tokenizer_files writes a small one for tests)"
            )
        backend = BackendTokenizer.from_file(str(tokenizer_file))
        config_file = model_dir / TOKENIZER_CONFIG_FILE
        config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
        return cls(
            backend,
            chat_template=find_chat_template(model_dir),
            eos_token=_token_content(config.get("eos_token")),
            pad_token=_token_content(config.get("pad_token")),
            model_dir=model_dir,
        )

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (the embedding table must be at least this large)."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def eos_token_id(self) -> int | None:
        return self.token_to_id(self.eos_token) if self.eos_token is not None else None

    def encode(self, text: str) -> list[int]:
        return self._backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._backend.id_to_token(token_id)

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        **template_kwargs: Any,
    ) -> str:
        """Render a conversation to the prompt string, e.g. `enable_thinking=False` as a template kwarg."""
        if self.chat_template is None:
            raise ValueError(missing_template_message(self.model_dir))
        # transformers exposes the special tokens to templates as variables; do the same.
        defaults = {"eos_token": self.eos_token, "pad_token": self.pad_token}
        template_kwargs = {**{k: v for k, v in defaults.items() if v is not None}, **template_kwargs}
        return render_chat_template(
            self.chat_template, messages, tools=tools, add_generation_prompt=add_generation_prompt, **template_kwargs
        )

    def encode_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        **template_kwargs: Any,
    ) -> list[int]:
        """Prompt token ids for a conversation (`apply_chat_template` then `encode`)."""
        return self.encode(self.apply_chat_template(messages, tools, add_generation_prompt, **template_kwargs))
