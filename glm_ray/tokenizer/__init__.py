"""Tokenizer, GLM chat template and streaming detokenizer."""

from glm_ray.tokenizer.builder import MARKUP_TOKENS, SPECIAL_TOKENS, write_tokenizer_files
from glm_ray.tokenizer.default_template import DEFAULT_CHAT_TEMPLATE
from glm_ray.tokenizer.detokenizer import IncrementalDetokenizer
from glm_ray.tokenizer.tokenizer import Tokenizer

__all__ = [
    "DEFAULT_CHAT_TEMPLATE",
    "MARKUP_TOKENS",
    "SPECIAL_TOKENS",
    "IncrementalDetokenizer",
    "Tokenizer",
    "write_tokenizer_files",
]
