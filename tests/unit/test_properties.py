"""Properties, over generated inputs, of GLM's tool-call parser and the chat template (glm-spec §4):
calls written in GLM's format parse back to the same name and arguments, whole or streamed in
any pieces; message text never runs as template code and survives rendering verbatim."""

import json

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from glm_ray.serving.openai.tool_calls import (  # noqa: E402
    ContentDelta, ToolCallArgsDelta, ToolCallStart, ToolCallStream, parse_tool_calls,
)
from glm_ray.tokenizer import DEFAULT_CHAT_TEMPLATE  # noqa: E402
from glm_ray.tokenizer.chat_template import render_chat_template  # noqa: E402

PROPERTY = settings(max_examples=300, deadline=None, database=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])
TAGS = ("<tool_call>", "</tool_call>", "<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>", "<think>",
        "</think>")
# text a model may put in names, keys and string values: anything but the format's own tags
PLAIN = st.text(st.characters(blacklist_categories=("Cs",)), max_size=30).filter(
    lambda s: not any(t in s for t in TAGS) and "<" not in s)
NAME = st.from_regex(r"[A-Za-z_][A-Za-z0-9_.-]{0,20}", fullmatch=True)
VALUE = st.one_of(PLAIN, st.integers(-10**12, 10**12), st.booleans(), st.none(),
                  st.lists(st.integers(-99, 99), max_size=3), st.dictionaries(NAME, st.integers(), max_size=2))


def typed_tool(name, args: dict) -> dict:
    kinds = {str: "string", int: "integer", bool: "boolean", type(None): "null", list: "array", dict: "object"}
    return {"type": "function", "function": {"name": name, "parameters": {
        "type": "object", "properties": {k: {"type": kinds[type(v)]} for k, v in args.items()}}}}


def glm_call(name: str, args: dict) -> str:
    """A call as GLM writes it: strings raw, everything else as JSON (glm-spec §4.3)."""
    body = "".join(f"<arg_key>{k}</arg_key>\n<arg_value>{v if isinstance(v, str) else json.dumps(v)}</arg_value>\n"
                   for k, v in args.items())
    return f"<tool_call>{name}\n{body}</tool_call>"


CALLS = st.lists(st.tuples(NAME, st.dictionaries(NAME, VALUE, max_size=4)), min_size=1, max_size=3)


@PROPERTY
@given(content=PLAIN, calls=CALLS)
def test_calls_in_glm_format_parse_back(content, calls):
    tools = [typed_tool(name, args) for name, args in calls]
    text = content + "\n".join(glm_call(name, args) for name, args in calls)
    got_content, parsed = parse_tool_calls(text, tools)
    assert (got_content or "").strip() == content.strip()
    assert [(c.name, json.loads(c.arguments_json)) for c in parsed] == [(n, a) for n, a in calls]


@PROPERTY
@given(content=PLAIN, calls=CALLS, cuts=st.lists(st.integers(1, 12), min_size=1, max_size=400))
def test_streamed_in_any_pieces_equals_parsed_whole(content, calls, cuts):
    tools = [typed_tool(name, args) for name, args in calls]
    text = content + "\n".join(glm_call(name, args) for name, args in calls)
    pieces, i = [], 0
    for n in cuts * (len(text) // max(1, sum(cuts)) + 1):
        if i >= len(text):
            break
        pieces.append(text[i:i + n])
        i += n
    stream = ToolCallStream(tools, id_factory=iter(f"call_{k}" for k in range(99)).__next__)
    events = [e for piece in pieces for e in stream.feed(piece)] + stream.finish()
    streamed_content = "".join(e.text for e in events if isinstance(e, ContentDelta))
    names = [e.name for e in events if isinstance(e, ToolCallStart)]
    arguments = {}
    for e in events:
        if isinstance(e, ToolCallArgsDelta):
            arguments[e.index] = arguments.get(e.index, "") + e.fragment
    whole_content, parsed = parse_tool_calls(text, tools)
    assert streamed_content == (whole_content or "")
    assert names == [c.name for c in parsed]
    assert [json.loads(arguments.get(i, "{}")) for i in range(len(parsed))] == \
        [json.loads(c.arguments_json) for c in parsed]


ANY_TEXT = st.text(max_size=60) | st.sampled_from([
    "{{ 7*7 }}", "{% for x in range(3) %}x{% endfor %}", "{{ messages }}", "{# comment #}",
    "{{ ''.__class__.__mro__ }}", "<|user|>", "{% raw %}", "}}{{", "\\n"])


@PROPERTY
@given(turns=st.lists(st.tuples(st.sampled_from(["system", "user", "assistant"]), ANY_TEXT), min_size=1, max_size=5),
       thinking=st.booleans())
def test_message_text_is_never_template_code(turns, thinking):
    messages = [{"role": role, "content": text} for role, text in turns]
    rendered = render_chat_template(DEFAULT_CHAT_TEMPLATE, messages, enable_thinking=thinking)
    for _, text in turns:
        assert text.strip() in rendered  # verbatim: "{{ 7*7 }}" stays itself, never "49"
    assert rendered.rstrip().endswith("<|assistant|>") or rendered.rstrip().endswith("<think></think>")


@PROPERTY
@given(name=NAME, description=ANY_TEXT, args=st.dictionaries(NAME, VALUE, max_size=3))
def test_tools_and_calls_render_with_any_text(name, description, args):
    tool = {"type": "function", "function": {"name": name, "description": description,
                                             "parameters": typed_tool(name, args)["function"]["parameters"]}}
    messages = [{"role": "user", "content": description},
                {"role": "assistant", "content": "",
                 "tool_calls": [{"id": "c0", "type": "function",
                                 "function": {"name": name, "arguments": json.dumps(args)}}]},
                {"role": "tool", "tool_call_id": "c0", "content": description}]
    rendered = render_chat_template(DEFAULT_CHAT_TEMPLATE, messages, tools=[tool])
    assert f"<tool_call>{name}" in rendered
    for key in args:
        assert f"<arg_key>{key}</arg_key>" in rendered
