"""Write a small, deterministic GLM-style tokenizer (tokenizer.json + tokenizer_config.json).

Real GLM-4.x checkpoints ship a 151k byte-level BPE vocabulary; tests and tiny random models need the
same shape at a few hundred or thousand ids. The vocabulary is laid out like GLM's:

    [0, 256)                       the 256 byte-level symbols (any UTF-8 text round-trips)
    [256, V - 21)                  BPE merges learned from `corpus.TRAINING_TEXT`, then unreachable
                                   `<|reserved_N|>` fillers if the corpus runs out of merges
    [V - 21, V - 11)               GLM's special tokens (skipped by skip_special_tokens)
    [V - 11, V)                    think/tool markup: added tokens that are NOT special, as in GLM,
                                   so they survive decoding and the output parsers can see them
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as BackendTokenizer

from glm_ray.tokenizer.corpus import TRAINING_TEXT
from glm_ray.tokenizer.default_template import DEFAULT_CHAT_TEMPLATE

SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "[MASK]",
    "[gMASK]",
    "[sMASK]",
    "<sop>",
    "<eop>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
)
MARKUP_TOKENS: tuple[str, ...] = (
    "<think>",
    "</think>",
    "<tool_call>",
    "</tool_call>",
    "<arg_key>",
    "</arg_key>",
    "<arg_value>",
    "</arg_value>",
    "<tool_response>",
    "</tool_response>",
    "/nothink",
)
EOS_TOKEN = "<|endoftext|>"

NUM_BYTE_SYMBOLS = 256
MIN_VOCAB_SIZE = NUM_BYTE_SYMBOLS + len(SPECIAL_TOKENS) + len(MARKUP_TOKENS)

# Same splitting rule family as GLM-4's tokenizer (cl100k-style): contractions, words with one leading
# non-letter, digits in groups of at most three, punctuation runs, newlines, other whitespace.
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _new_backend() -> BackendTokenizer:
    backend = BackendTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    return backend


def build_backend_tokenizer(vocab_size: int) -> BackendTokenizer:
    """Train the BPE on the built-in corpus and append GLM's tokens at the last ids."""
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: a byte-level GLM tokenizer needs at least "
            f"{MIN_VOCAB_SIZE} ids (256 byte symbols + {MIN_VOCAB_SIZE - NUM_BYTE_SYMBOLS} GLM tokens)"
        )
    num_model_ids = vocab_size - len(SPECIAL_TOKENS) - len(MARKUP_TOKENS)
    backend = _new_backend()
    trainer = trainers.BpeTrainer(
        vocab_size=num_model_ids,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    backend.train_from_iterator([TRAINING_TEXT], trainer=trainer)

    num_trained = backend.get_vocab_size(with_added_tokens=False)
    if num_trained < num_model_ids:
        # The corpus ran out of merges; fillers keep the special tokens at the end of the vocabulary.
        # They have no merges, so encoding never produces them.
        spec = json.loads(backend.to_str())
        vocab = spec["model"]["vocab"]
        for filler_id in range(num_trained, num_model_ids):
            vocab[f"<|reserved_{filler_id - num_trained}|>"] = filler_id
        backend = BackendTokenizer.from_str(json.dumps(spec))

    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in MARKUP_TOKENS])
    assert backend.get_vocab_size(with_added_tokens=True) == vocab_size
    return backend


def _tokenizer_config(token_ids: dict[str, int]) -> dict:
    special = set(SPECIAL_TOKENS)
    added_tokens_decoder = {
        str(token_id): {
            "content": token,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": token in special,
        }
        for token, token_id in token_ids.items()
    }
    return {
        "added_tokens_decoder": added_tokens_decoder,
        # The name transformers 4.x and 5.x both accept (5.x reads it as extra_special_tokens).
        "additional_special_tokens": [t for t in SPECIAL_TOKENS if t != EOS_TOKEN],
        "chat_template": DEFAULT_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "do_lower_case": False,
        "eos_token": EOS_TOKEN,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": 202752,
        "pad_token": EOS_TOKEN,
        "padding_side": "left",
        "remove_space": False,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }


def write_tokenizer_files(out_dir: Path, vocab_size: int) -> dict[str, int]:
    """Write tokenizer.json and tokenizer_config.json into `out_dir`; return GLM token -> id.

    Byte-identical for equal `vocab_size` across calls and processes.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    backend = build_backend_tokenizer(vocab_size)
    token_ids = {token: backend.token_to_id(token) for token in SPECIAL_TOKENS + MARKUP_TOKENS}

    (out_dir / "tokenizer.json").write_text(backend.to_str(pretty=True) + "\n", encoding="utf-8")
    config_text = json.dumps(_tokenizer_config(token_ids), indent=2, ensure_ascii=False)
    (out_dir / "tokenizer_config.json").write_text(config_text + "\n", encoding="utf-8")
    return token_ids
