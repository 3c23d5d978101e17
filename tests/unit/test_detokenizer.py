"""Streaming detokenization never shows half a character and adds up to the full decode."""

import pytest

from glm_ray.tokenizer import IncrementalDetokenizer, Tokenizer, write_tokenizer_files

REPLACEMENT = "\ufffd"


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    path = tmp_path_factory.mktemp("glm_tokenizer")
    write_tokenizer_files(path, 1024)
    return Tokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def prompt_ids(tok) -> list[int]:
    return tok.encode_chat([{"role": "user", "content": "Say something in many scripts."}])


def stream(tok, prompt_ids, output_ids, skip_special_tokens=True):
    detok = IncrementalDetokenizer(tok, prompt_ids, skip_special_tokens=skip_special_tokens)
    deltas = [detok.add(token_id) for token_id in output_ids]
    deltas.append(detok.flush())
    assert detok.output_token_ids == list(output_ids)
    return deltas


@pytest.mark.parametrize("text", [
    "Crab 🦀 and rocket 🚀, thumbs 👍🏽!",
    "你好世界，鰻重是日本料理。",
    "こんにちは 안녕하세요 café ✅",
    "plain ASCII text with numbers 12345 and code: return x + 1",
])
def test_multibyte_characters_are_never_split(tok, prompt_ids, text):
    output_ids = tok.encode(text)
    deltas = stream(tok, prompt_ids, output_ids)
    assert "".join(deltas) == tok.decode(output_ids) == text
    assert not any(REPLACEMENT in delta for delta in deltas)


def test_the_test_text_really_splits_characters_across_tokens(tok):
    # Guards the test above: byte-level tokens for emoji/CJK decode to U+FFFD on their own.
    assert any(REPLACEMENT in tok.decode([token_id]) for token_id in tok.encode("🦀 鰻重"))


def test_text_arrives_as_soon_as_a_character_completes(tok, prompt_ids):
    output_ids = tok.encode("ab🦀")
    deltas = stream(tok, prompt_ids, output_ids)
    assert deltas[0] == "ab" or deltas[:2] == ["a", "b"]
    assert deltas[-2] == "🦀" and deltas[-1] == ""
    assert all(delta == "" for delta in deltas[len(tok.encode("ab")):-2])


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_special_and_markup_tokens(tok, prompt_ids, skip_special_tokens):
    text = (
        "\n<think>想一想 🤔</think>\n答案"
        "<tool_call>f\n<arg_key>k</arg_key>\n<arg_value>值</arg_value>\n</tool_call><|observation|>"
    )
    output_ids = tok.encode(text)
    deltas = stream(tok, prompt_ids, output_ids, skip_special_tokens)
    assert "".join(deltas) == tok.decode(output_ids, skip_special_tokens=skip_special_tokens)
    assert "".join(deltas).endswith("</tool_call>" if skip_special_tokens else "<|observation|>")
    assert not any(REPLACEMENT in delta for delta in deltas)


def test_sequence_ending_mid_character_is_flushed(tok, prompt_ids):
    crab_ids = tok.encode("🦀")
    output_ids = tok.encode("ok ") + crab_ids[:-1]  # generation stopped inside the emoji
    detok = IncrementalDetokenizer(tok, prompt_ids)
    streamed = "".join(detok.add(token_id) for token_id in output_ids)
    assert streamed == "ok "
    tail = detok.flush()
    assert streamed + tail == tok.decode(output_ids)
    assert tail.startswith(REPLACEMENT) and detok.flush() == ""


def test_prompt_ending_mid_character_does_not_leak_into_output(tok):
    crab_ids = tok.encode("🦀")
    prompt_ids, output_ids = crab_ids[:1], crab_ids[1:] + tok.encode(" done")
    assert "".join(stream(tok, prompt_ids, output_ids)) == tok.decode(output_ids)


def test_empty_prompt(tok):
    output_ids = tok.encode("héllo wörld")
    assert "".join(stream(tok, [], output_ids)) == "héllo wörld"


def test_each_step_decodes_a_bounded_window(tok, prompt_ids):
    calls = []

    class CountingTokenizer:
        def decode(self, ids, skip_special_tokens=True):
            calls.append(len(ids))
            return tok.decode(ids, skip_special_tokens=skip_special_tokens)

    text = "The weather in 北京 is sunny 🌞 today. " * 40
    output_ids = tok.encode(text)
    assert len(output_ids) > 400
    deltas = stream(CountingTokenizer(), prompt_ids, output_ids)
    assert "".join(deltas) == text
    assert max(calls) <= 12  # a few tokens of context, never the whole sequence
