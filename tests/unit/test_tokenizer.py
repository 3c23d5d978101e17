"""The generated GLM-style tokenizer and the Tokenizer wrapper, checked against transformers."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from glm_ray.tokenizer import MARKUP_TOKENS, SPECIAL_TOKENS, Tokenizer, write_tokenizer_files

VOCAB_SIZE = 1024

TEXTS = [
    "Hello, world! The weather is sunny today.",
    "def softmax(values):\n    return [v / sum(values) for v in values]\n",
    "你好，世界！北京明天的天气是晴天。",
    "こんにちは 안녕하세요 🦀🚀 😀👍🏽 café naïve",
    "  leading and trailing spaces  \n\n\ttabs\r\n",
    '{"city": "Beijing", "temp": 26, "ok": true}',
    "",
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("glm_tokenizer")
    write_tokenizer_files(path, VOCAB_SIZE)
    return path


@pytest.fixture(scope="module")
def tok(model_dir) -> Tokenizer:
    return Tokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def hf_tok(model_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(model_dir))


def test_files_are_byte_identical_across_calls(tmp_path):
    first = write_tokenizer_files(tmp_path / "a", VOCAB_SIZE)
    second = write_tokenizer_files(tmp_path / "b", VOCAB_SIZE)
    assert first == second
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_files_are_byte_identical_across_processes(tmp_path):
    # BPE training must not depend on hash seeds or thread scheduling: workers regenerate test models.
    write_tokenizer_files(tmp_path / "here", VOCAB_SIZE)
    code = "import sys; from glm_ray.tokenizer import write_tokenizer_files; write_tokenizer_files(sys.argv[1], 1024)"
    repo_root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": repo_root, "PYTHONHASHSEED": "123", "RAYON_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "there")], check=True, env=env)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "here" / name).read_bytes() == (tmp_path / "there" / name).read_bytes()


def test_glm_tokens_take_the_last_ids_in_glm_order(tmp_path):
    token_ids = write_tokenizer_files(tmp_path, VOCAB_SIZE)
    assert list(token_ids) == list(SPECIAL_TOKENS + MARKUP_TOKENS)
    assert list(token_ids.values()) == list(range(VOCAB_SIZE - 21, VOCAB_SIZE))
    assert token_ids["<|endoftext|>"] == VOCAB_SIZE - 21
    assert token_ids["/nothink"] == VOCAB_SIZE - 1
    tok = Tokenizer.from_pretrained(tmp_path)
    assert tok.vocab_size == VOCAB_SIZE
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == token_ids["<|endoftext|>"]


@pytest.mark.parametrize("vocab_size", [277, 4096])
def test_other_vocab_sizes_keep_the_layout(tmp_path, vocab_size):
    # 4096 is more than the built-in corpus can merge, so unreachable fillers pad the middle.
    token_ids = write_tokenizer_files(tmp_path, vocab_size)
    tok = Tokenizer.from_pretrained(tmp_path)
    assert tok.vocab_size == vocab_size
    assert token_ids["/nothink"] == vocab_size - 1
    for text in TEXTS:
        ids = tok.encode(text)
        assert max(ids, default=0) < vocab_size - 21
        assert tok.decode(ids) == text


def test_too_small_vocab_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="at least 277"):
        write_tokenizer_files(tmp_path, 200)


@pytest.mark.parametrize("text", TEXTS)
def test_any_text_round_trips(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_common_words_are_single_tokens(tok):
    for word in ["Hello", " the", " weather", " return", " self", "def", " model"]:
        assert len(tok.encode(word)) == 1, word
    assert len(tok.encode("The weather is sunny today.")) <= 7


def test_glm_tokens_encode_as_single_ids(tok):
    for token in SPECIAL_TOKENS + MARKUP_TOKENS:
        token_id = tok.token_to_id(token)
        assert tok.encode(token) == [token_id]
        assert tok.id_to_token(token_id) == token
    ids = tok.encode("<tool_call>get_weather\n<arg_key>city</arg_key>")
    assert ids[0] == tok.token_to_id("<tool_call>")
    assert tok.token_to_id("<arg_key>") in ids and tok.token_to_id("</arg_key>") == ids[-1]


def test_special_tokens_are_skipped_but_markup_survives_decode(tok):
    assert tok.special_token_ids == {tok.token_to_id(t) for t in SPECIAL_TOKENS}
    text = "[gMASK]<sop><|user|>\nHi<|assistant|>\n<think>plan</think>\n<tool_call>f\n</tool_call><|observation|>"
    ids = tok.encode(text)
    assert tok.decode(ids, skip_special_tokens=False) == text
    assert tok.decode(ids) == "\nHi\n<think>plan</think>\n<tool_call>f\n</tool_call>"


def test_encode_does_not_add_prefix_tokens(tok):
    assert tok.encode("Hello") == [tok.token_to_id("Hello")]
    prompt_ids = tok.encode_chat([{"role": "user", "content": "Hello"}])
    gmask, sop = tok.token_to_id("[gMASK]"), tok.token_to_id("<sop>")
    assert prompt_ids[:2] == [gmask, sop]
    assert prompt_ids.count(gmask) == 1
    assert prompt_ids[-1] == tok.token_to_id("<|assistant|>")


@pytest.mark.parametrize("text", TEXTS + [
    "[gMASK]<sop><|system|>\nsys<|user|>\nq/nothink<|assistant|>\n<think></think>\nA",
    "<think>\nreasoning\n</think>text<tool_call>f\n<arg_key>k</arg_key>\n<arg_value>v</arg_value>\n</tool_call>",
    "<|endoftext|>[MASK][sMASK]<eop><tool_response>\nr\n</tool_response>",
])
def test_transformers_autotokenizer_agrees(tok, hf_tok, text):
    ids = tok.encode(text)
    assert hf_tok.encode(text, add_special_tokens=False) == ids
    assert hf_tok.encode(text) == ids  # no [gMASK]<sop> post-processor
    assert hf_tok.decode(ids, skip_special_tokens=True) == tok.decode(ids)
    assert hf_tok.decode(ids, skip_special_tokens=False) == tok.decode(ids, skip_special_tokens=False)


def test_transformers_sees_the_same_specials(tok, hf_tok):
    assert len(hf_tok) == VOCAB_SIZE
    assert hf_tok.eos_token == "<|endoftext|>" and hf_tok.pad_token == "<|endoftext|>"
    assert set(hf_tok.all_special_ids) == tok.special_token_ids


def test_missing_tokenizer_json_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "tokenizer.json"))):
        Tokenizer.from_pretrained(tmp_path)
