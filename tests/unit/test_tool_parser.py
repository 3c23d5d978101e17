import itertools
import json
import random
import re

import pytest

from glm_ray.serving.openai.reasoning import ReasoningStream, split
from glm_ray.serving.openai.tool_calls import (
    ContentDelta, ParsedCall, ToolCallArgsDelta, ToolCallStart, ToolCallStream, make_tool_call_id,
    parse_tool_calls, validate_tool_choice, validate_tools)


def tool(name, **properties):
    return {"type": "function", "function": {
        "name": name, "parameters": {"type": "object", "properties": properties}}}


WEATHER = tool("get_weather", city={"type": "string"}, date={"type": "string"})
TYPED = tool("f", s={"type": "string"}, i={"type": "integer"}, n={"type": "number"}, a={"type": "array"},
             b={"type": "boolean"}, o={"type": "object"}, si={"type": ["string", "integer"]},
             sn={"type": ["string", "null"]}, any_of={"anyOf": [{"type": "string"}, {"type": "integer"}]},
             code={"type": "string"})
TOOLS = [WEATHER, TYPED, tool("g")]

SPEC_OUTPUT = ("<think>Need to call get_weather.</think>\n<tool_call>get_weather\n<arg_key>city</arg_key>\n"
               "<arg_value>Beijing</arg_value>\n<arg_key>date</arg_key>\n<arg_value>2024-06-27</arg_value>\n"
               "</tool_call>")
PARALLEL = ("Let me check.\n<tool_call>f\n<arg_key>a</arg_key>\n<arg_value>1</arg_value>\n<arg_key>b</arg_key>\n"
            "<arg_value>x y</arg_value>\n<arg_key>c</arg_key>\n<arg_value>[1, 2]</arg_value>\n</tool_call>\n"
            "<tool_call>g\n</tool_call>")


def call(name, key, value):
    return f"<tool_call>{name}\n<arg_key>{key}</arg_key>\n<arg_value>{value}</arg_value>\n</tool_call>"


CASES = [
    SPEC_OUTPUT.split("</think>\n")[1],
    PARALLEL,
    "Just an answer, no tools.\n",
    "",
    "   \n",
    "<tool_call>g\n</tool_call>",
    call("get_weather", "city", "北京 🌧") + "\n" + call("f", "s", "123"),
    call("f", "code", 'if a < b and c <= d: print("<tool>", "\\n", "</arg")\n\t'),
    call("f", "s", "</arg_value") + "tail dropped" + call("f", "i", "42") + "\ntext after dropped",
    "<tool_call>f<arg_key>i</arg_key><arg_value>7</arg_value></tool_call>",
    "<tool_call>f\n<arg_key> s </arg_key>  \n\t<arg_value>x</arg_value><arg_key>i</arg_key>junk<arg_value>1"
    "</arg_value>\n</tool_call>",
    "<tool_call>f\n<arg_key>s</arg_key>\n<arg_value>open at the end</tool_call>",
    "<tool_call>f\n<arg_key>o</arg_key>\n<arg_value>{\"a\": {\"b\": [1, \"x\"]}}</arg_value>\n</tool_call>",
    "<tool_call>\n<arg_key>s</arg_key><arg_value>x</arg_value></tool_call>" + call("g", "k", "v"),
    "Text ending in a near-tag <tool_",
    "Before\n" + call("get_weather", "city", "Par") + "<tool_call>get_weather\n<arg_key>city</arg_key>\n"
    "<arg_value>Ber",
    "<tool_call>get_weather\n<arg_key>ci",
    "<tool_call>get_wea",
    "<tool_call>f\n<arg_key>i</arg_key>\n<arg_value>12",
]


def run_stream(text, pieces, tools=TOOLS):
    """Feed `pieces`; return (content, calls, events), checking no emitted text is ever taken back."""
    ids = (f"call_{n}" for n in itertools.count())
    parser = ToolCallStream(tools, id_factory=lambda: next(ids))
    final_content, final_calls = parse_tool_calls(text, tools)
    events = []
    for piece in pieces:
        events += parser.feed(piece)
        content, calls = collect(events)
        assert (final_content or "").startswith(content)
        for i, (name, args) in enumerate(calls):
            if i < len(final_calls):  # a truncated last call has no final form
                assert name == final_calls[i].name and final_calls[i].arguments_json.startswith(args)
    events += parser.finish()
    return *collect(events), events


def collect(events):
    content, calls = "", []
    for event in events:
        if isinstance(event, ContentDelta):
            content += event.text
        elif isinstance(event, ToolCallStart):
            assert event.index == len(calls) and event.id == f"call_{event.index}"
            calls.append([event.name, ""])
        else:
            calls[event.index][1] += event.fragment
    return content, [tuple(c) for c in calls]


def as_stream_result(text, tools=TOOLS):
    content, calls = parse_tool_calls(text, tools)
    return content or "", [(c.name, c.arguments_json) for c in calls]


def random_pieces(text, seed):
    rng, pieces, i = random.Random(seed), [], 0
    while i < len(text):
        n = rng.randint(1, 8)
        pieces.append(text[i:i + n])
        i += n
    return pieces


def args(text, tools=TOOLS):
    return [json.loads(c.arguments_json) for c in parse_tool_calls(text, tools)[1]]


def test_spec_example_after_reasoning_split():
    reasoning, content = split(SPEC_OUTPUT)
    assert reasoning == "Need to call get_weather."
    assert parse_tool_calls(content, [WEATHER]) == (
        None, [ParsedCall("get_weather", '{"city": "Beijing", "date": "2024-06-27"}')])


def test_parallel_calls_and_content_before_them():
    content, calls = parse_tool_calls(PARALLEL, None)
    assert content == "Let me check."
    assert [c.name for c in calls] == ["f", "g"]
    assert [json.loads(c.arguments_json) for c in calls] == [{"a": 1, "b": "x y", "c": [1, 2]}, {}]
    assert calls[1].arguments_json == "{}"


@pytest.mark.parametrize("key, raw, expected", [
    ("s", "123", "123"), ("i", "123", 123), ("n", "1.5", 1.5), ("a", "[1, 2]", [1, 2]), ("b", "true", True),
    ("o", '{"a": {"b": [1, "x"]}}', {"a": {"b": [1, "x"]}}), ("i", "abc", "abc"), ("s", "null", "null"),
    ("si", "123", 123), ("si", "abc", "abc"), ("si", "[1]", "[1]"), ("sn", "null", None), ("sn", "1", "1"),
    ("any_of", "7", 7), ("unknown", "123", 123), ("unknown", "[1, 2]", [1, 2]), ("unknown", "Paris", "Paris"),
    ("unknown", "NaN", "NaN"), ("s", " padded\n", " padded\n"), ("unknown", "北京", "北京"),
])
def test_values_are_typed_by_the_schema(key, raw, expected):
    value = args(call("f", key, raw))[0][key]
    assert value == expected and type(value) is type(expected)


def test_arguments_json_is_json_dumps_without_ascii_escapes():
    text = call("get_weather", "city", '北京 "quoted"\n')
    (parsed,) = parse_tool_calls(text, TOOLS)[1]
    assert parsed.arguments_json == json.dumps({"city": '北京 "quoted"\n'}, ensure_ascii=False)


def test_values_with_angle_brackets_are_not_tags():
    value = 'if a < b and c <= d: print("<tool>", "\\n", "</arg")\n\t'
    assert args(call("f", "code", value)) == [{"code": value}]


def test_layout_variants():
    assert args("<tool_call>f<arg_key>i</arg_key><arg_value>7</arg_value></tool_call>") == [{"i": 7}]
    # Keys are stripped, whitespace between tags skipped, a key not followed by a value ignored.
    assert args(CASES[10]) == [{"s": "x"}]
    # A value still open at </tool_call> ends there.
    assert args(CASES[11]) == [{"s": "open at the end"}]


def test_text_between_and_after_calls_is_dropped_and_nameless_calls_skipped():
    content, calls = parse_tool_calls(CASES[8], TOOLS)
    assert content is None and [json.loads(c.arguments_json) for c in calls] == [{"s": "</arg_value"}, {"i": 42}]
    assert [c.name for c in parse_tool_calls(CASES[13], TOOLS)[1]] == ["g"]


def test_content_without_calls():
    assert parse_tool_calls("Just an answer.\n", TOOLS) == ("Just an answer.", [])
    assert parse_tool_calls("  \n", TOOLS) == (None, [])
    assert parse_tool_calls("Ends in <tool_", TOOLS) == ("Ends in <tool_", [])


def test_truncated_call_is_dropped_but_earlier_ones_kept():
    content, calls = parse_tool_calls(CASES[15], TOOLS)
    assert content == "Before" and calls == [ParsedCall("get_weather", '{"city": "Par"}')]
    assert parse_tool_calls("<tool_call>get_wea", TOOLS) == (None, [])


def test_truncated_call_stream_stops_without_closing_brace():
    content, calls, _ = run_stream(CASES[15], list(CASES[15]))
    assert content == "Before"
    assert calls == [("get_weather", '{"city": "Par"}'), ("get_weather", '{"city": "Ber')]
    # A non-string value is never sent half-way, so nothing of it shows.
    assert run_stream(CASES[18], list(CASES[18]))[1] == [("f", "{")]


@pytest.mark.parametrize("text", CASES)
def test_stream_one_char_at_a_time_matches_parse(text):
    content, calls, _ = run_stream(text, list(text))
    expected_content, expected_calls = as_stream_result(text)
    truncated = text.count("<tool_call>") > text.count("</tool_call>")
    assert content == expected_content
    assert (calls[:-1] if truncated and len(calls) > len(expected_calls) else calls) == expected_calls


@pytest.mark.parametrize("text", [c for c in CASES if c.count("<tool_call>") == c.count("</tool_call>")])
@pytest.mark.parametrize("seed", range(8))
def test_stream_random_chunks_matches_parse(text, seed):
    assert run_stream(text, random_pieces(text, seed))[:2] == as_stream_result(text)


def test_stream_in_one_delta_and_without_tools():
    for text in CASES[:14]:
        assert run_stream(text, [text] if text else [])[:2] == as_stream_result(text)
        assert run_stream(text, list(text), tools=None)[:2] == as_stream_result(text, None)


def test_stream_sends_string_values_early_and_others_when_closed():
    parser = ToolCallStream(TOOLS, id_factory=lambda: "call_0")
    assert parser.feed("Sure.\n<tool_") == [ContentDelta("Sure.")]
    assert parser.feed("call>get_wea") == []  # name only once complete
    assert parser.feed("ther\n<arg_key>city</arg_key>\n<arg_value>Bei") == [
        ToolCallStart(0, "call_0", "get_weather"), ToolCallArgsDelta(0, '{"city": "Bei')]
    assert parser.feed('"jing"</arg_val') == [ToolCallArgsDelta(0, '\\"jing\\"')]
    assert parser.feed("ue>") == [ToolCallArgsDelta(0, '"')]
    assert parser.feed("<arg_key>days</arg_key><arg_value>12") == []
    assert parser.feed("</arg_value></tool_call>") == [ToolCallArgsDelta(0, ', "days": 12}')]
    assert parser.finish() == []


def test_no_partial_tag_in_any_emitted_text():
    tags = ("<tool_call>", "</tool_call>", "<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>")
    text = CASES[0] + "\n" + CASES[6]
    for pieces in (list(text), random_pieces(text, 0)):
        for event in run_stream(text, pieces)[2]:
            emitted = getattr(event, "text", getattr(event, "fragment", ""))
            assert not any(emitted.endswith(tag[:n]) for tag in tags for n in range(2, len(tag) + 1))


def test_reasoning_then_tool_stream_pipeline():
    reasoning_stream, tool_stream = ReasoningStream(), ToolCallStream([WEATHER], id_factory=lambda: "call_0")
    reasoning, events = "", []
    for piece in random_pieces(SPEC_OUTPUT, 3):
        delta = reasoning_stream.feed(piece)
        reasoning += delta.reasoning
        events += tool_stream.feed(delta.content)
    events += tool_stream.feed(reasoning_stream.finish().content) + tool_stream.finish()
    assert reasoning == "Need to call get_weather."
    assert collect(events) == ("", [("get_weather", '{"city": "Beijing", "date": "2024-06-27"}')])


def test_tool_call_ids():
    assert re.fullmatch(r"call_[0-9a-f]{24}", make_tool_call_id())
    assert make_tool_call_id() != make_tool_call_id()


def test_validate_tools_accepts_openai_tools():
    validate_tools(None)
    validate_tools([])
    validate_tools(TOOLS + [{"type": "function", "function": {"name": "a.b-c_1", "description": "d"}}])


@pytest.mark.parametrize("tools, message", [
    ({"type": "function"}, "tools must be a list"),
    ([WEATHER, {"type": "code"}], r"tools\[1\]\.type"),
    ([{"type": "function"}], r"tools\[0\]\.function must"),
    ([{"type": "function", "function": {"name": ""}}], r"tools\[0\]\.function\.name"),
    ([{"type": "function", "function": {"name": "get weather"}}], r"tools\[0\]\.function\.name"),
    ([{"type": "function", "function": {"name": "f", "description": 3}}], "description"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}], "parameters"),
    ([{"type": "function", "function": {"name": "f", "parameters": "{}"}}], "parameters"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": []}}}],
     "properties"),
])
def test_validate_tools_names_the_bad_field(tools, message):
    with pytest.raises(ValueError, match=message):
        validate_tools(tools)


def test_validate_tool_choice():
    for choice in (None, "none", "auto", "required", {"type": "function", "function": {"name": "g"}}):
        validate_tool_choice(choice, TOOLS)
    validate_tool_choice("auto", None)
    with pytest.raises(ValueError, match="required"):
        validate_tool_choice("required", None)
    with pytest.raises(ValueError, match="'any'"):
        validate_tool_choice("any", TOOLS)
    with pytest.raises(ValueError, match="'missing', which is not in `tools`"):
        validate_tool_choice({"type": "function", "function": {"name": "missing"}}, TOOLS)
    with pytest.raises(ValueError, match="tool_choice object"):
        validate_tool_choice({"type": "function", "name": "g"}, TOOLS)
