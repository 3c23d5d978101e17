import random

import pytest

from glm_ray.serving.openai.reasoning import ReasoningStream, split, thinking_enabled

SPEC_OUTPUT = ("<think>Need to call get_weather.</think>\n<tool_call>get_weather\n<arg_key>city</arg_key>\n"
               "<arg_value>Beijing</arg_value>\n<arg_key>date</arg_key>\n<arg_value>2024-06-27</arg_value>\n"
               "</tool_call>")

CASES = [
    SPEC_OUTPUT,
    "<think>Plan.</think>\nHello!",
    "\n<think>\nstep 1\n\nstep 2\n</think>\n\nAnswer\n",
    "Hello, no thinking here.",
    "\n\nHi <think>not at the start</think>",
    "<think>cut short by max_tokens",
    "<think>cut inside the tag</thi",
    "<thi",
    "\n",
    "",
    "<think></think>",
    "<think></think>\nonly content",
    "<think>a < b, <thinking> and </thinks> are text</think>x <think>y</think>",
    "<think>思考 🤔</think>\n答案：北京",
    "  <think>\n\n</think>\n\n  indented content",
]


def stream(text, pieces, enabled=True):
    """Feed `pieces` (which concatenate to `text`); return the fields as the client sees them."""
    assert "".join(pieces) == text
    parser, reasoning, content = ReasoningStream(enabled), "", ""
    final_reasoning, final_content = (f or "" for f in split(text, enabled))
    for piece in pieces:
        delta = parser.feed(piece)
        reasoning, content = reasoning + delta.reasoning, content + delta.content
        # Nothing sent is ever taken back, so a held-back partial tag never leaks.
        assert final_reasoning.startswith(reasoning) and final_content.startswith(content)
    delta = parser.finish()
    return (reasoning + delta.reasoning) or None, (content + delta.content) or None


def random_pieces(text, seed):
    rng, pieces, i = random.Random(seed), [], 0
    while i < len(text):
        n = rng.randint(1, 6)
        pieces.append(text[i:i + n])
        i += n
    return pieces


def test_spec_example():
    reasoning, content = split(SPEC_OUTPUT)
    assert reasoning == "Need to call get_weather."
    assert content.startswith("<tool_call>get_weather\n") and content.endswith("</tool_call>")


@pytest.mark.parametrize("text, expected", [
    ("<think>Plan.</think>\nHello!", ("Plan.", "Hello!")),
    ("\n<think>\nstep 1\n\nstep 2\n</think>\n\nAnswer\n", ("step 1\n\nstep 2", "Answer\n")),
    ("Hello, no thinking here.", (None, "Hello, no thinking here.")),
    ("\n\nHi <think>not at the start</think>", (None, "Hi <think>not at the start</think>")),
    ("<think>cut short by max_tokens", ("cut short by max_tokens", None)),
    ("<think></think>", (None, None)),
    ("<think>\n\n</think>\n", (None, None)),
    ("", (None, None)),
    ("<think>a </think> b</think>", ("a ", " b</think>")),  # only newlines are trimmed
    ("  <think>x</think>\n\n  indented", ("x", "  indented")),
])
def test_split(text, expected):
    assert split(text) == expected


def test_disabled_thinking_is_all_content():
    assert split("\nHello", enabled=False) == (None, "Hello")
    assert split("<think>x</think>y", enabled=False) == (None, "<think>x</think>y")


def test_thinking_enabled_reads_the_prompt():
    assert thinking_enabled("[gMASK]<sop><|user|>\nHello<|assistant|>")
    assert not thinking_enabled("[gMASK]<sop><|user|>\nHello/nothink<|assistant|>\n<think></think>")


@pytest.mark.parametrize("text", CASES)
@pytest.mark.parametrize("enabled", [True, False])
def test_stream_one_char_at_a_time_matches_split(text, enabled):
    assert stream(text, list(text), enabled) == split(text, enabled)


@pytest.mark.parametrize("text", CASES)
@pytest.mark.parametrize("seed", range(5))
def test_stream_random_chunks_matches_split(text, seed):
    assert stream(text, random_pieces(text, seed)) == split(text)


def test_stream_whole_text_in_one_delta():
    for text in CASES:
        assert stream(text, [text] if text else []) == split(text)


def test_partial_tags_are_held_back():
    parser = ReasoningStream()
    assert parser.feed("\n<thi") == ("", "")
    assert parser.feed("nk>Plan") == ("Plan", "")
    assert parser.feed("\n</thi") == ("", "")  # the newline may be the one before </think>
    assert parser.feed("nk>\nAns") == ("", "Ans")
    assert parser.feed("wer") == ("", "wer")
    assert parser.finish() == ("", "")


def test_partial_tag_that_is_not_a_tag_is_released():
    parser = ReasoningStream()
    parser.feed("<think>a </th")
    assert parser.feed("ere") == ("</there", "")


def test_finish_flushes_unclosed_reasoning():
    parser = ReasoningStream()
    assert parser.feed("<think>cut") == ("cut", "")
    assert parser.feed("\n</thin") == ("", "")
    assert parser.finish() == ("\n</thin", "")


def test_content_without_think_streams_at_once():
    parser = ReasoningStream()
    assert parser.feed("\nHel") == ("", "Hel")
    assert parser.feed("lo\n") == ("", "lo\n")
