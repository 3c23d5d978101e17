"""GLM-4.6 chat format (glm-spec §4.2): spec examples, template lookup and transformers parity."""

import json

import jinja2
import pytest

from glm_ray.tokenizer import DEFAULT_CHAT_TEMPLATE, Tokenizer, write_tokenizer_files
from glm_ray.tokenizer.chat_template import find_chat_template, load_chat_template, render_chat_template

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the weather of a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "date": {"type": "string"}},
            "required": ["city"],
        },
    },
}

# Spec example (c), copied verbatim.
EXAMPLE_C = """[gMASK]<sop><|system|>
# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{"type": "function", "function": {"name": "get_weather", "description": "Get the weather of a city.", "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "date": {"type": "string"}}, "required": ["city"]}}}
</tools>

For each function call, output the function name and arguments within the following XML format:
<tool_call>{function-name}
<arg_key>{arg-key-1}</arg_key>
<arg_value>{arg-value-1}</arg_value>
<arg_key>{arg-key-2}</arg_key>
<arg_value>{arg-value-2}</arg_value>
...
</tool_call><|system|>
You are a helpful assistant.<|user|>
Weather in Beijing tomorrow?<|assistant|>
<think>Need to call get_weather.</think>
<tool_call>get_weather
<arg_key>city</arg_key>
<arg_value>Beijing</arg_value>
<arg_key>date</arg_key>
<arg_value>2024-06-27</arg_value>
</tool_call><|observation|>
<tool_response>
{"weather": "sunny", "temp": 26}
</tool_response><|assistant|>"""

# Spec example (d), copied verbatim (the spec elides the prefix with "…").
EXAMPLE_D_TAIL = "<|assistant|>\n<think></think>\nLet me check.\n<tool_call>f\n<arg_key>a</arg_key>\n<arg_value>1</arg_value>\n<arg_key>b</arg_key>\n<arg_value>x y</arg_value>\n<arg_key>c</arg_key>\n<arg_value>[1, 2]</arg_value>\n</tool_call>\n<tool_call>g\n</tool_call><|observation|>\n<tool_response>\nr1\n</tool_response>\n<tool_response>\nr2\n</tool_response><|assistant|>"  # noqa: E501

CONVERSATION_C = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Weather in Beijing tomorrow?"},
    {
        "role": "assistant",
        "content": "",
        "reasoning_content": "Need to call get_weather.",
        "tool_calls": [{"type": "function", "function": {
            "name": "get_weather", "arguments": {"city": "Beijing", "date": "2024-06-27"}}}],
    },
    {"role": "tool", "content": '{"weather": "sunny", "temp": 26}'},
]


def render(messages, **kwargs):
    return render_chat_template(DEFAULT_CHAT_TEMPLATE, messages, **kwargs)


def test_example_a_default_one_user_turn():
    assert render([{"role": "user", "content": "Hello"}]) == "[gMASK]<sop><|user|>\nHello<|assistant|>"


def test_example_b_thinking_disabled():
    expected = "[gMASK]<sop><|user|>\nHello/nothink<|assistant|>\n<think></think>"
    assert render([{"role": "user", "content": "Hello"}], enable_thinking=False) == expected
    # A user who already typed /nothink does not get it twice.
    assert render([{"role": "user", "content": "Hello/nothink"}], enable_thinking=False) == expected


def test_example_c_tools_system_call_and_result():
    assert render(CONVERSATION_C, tools=[WEATHER_TOOL]) == EXAMPLE_C


def test_example_d_non_string_args_and_parallel_calls_with_openai_string_arguments():
    messages = [
        {"role": "user", "content": "Run f and g."},
        {"role": "assistant", "content": "  Let me check.\n", "tool_calls": [
            {"id": "call_0", "type": "function",
             "function": {"name": "f", "arguments": json.dumps({"a": 1, "b": "x y", "c": [1, 2]})}},
            {"id": "call_1", "type": "function", "function": {"name": "g", "arguments": "{}"}},
        ]},
        {"role": "tool", "tool_call_id": "call_0", "content": "r1"},
        {"role": "tool", "tool_call_id": "call_1", "content": "r2"},
    ]
    assert render(messages) == "[gMASK]<sop><|user|>\nRun f and g." + EXAMPLE_D_TAIL


def test_reasoning_only_kept_for_the_current_turn():
    messages = [
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "<think>old thoughts</think>\nA1"},
        {"role": "user", "content": "Q2"},
        {"role": "assistant", "content": "A2", "reasoning_content": "\nnew thoughts\n"},
    ]
    assert render(messages, add_generation_prompt=False) == (
        "[gMASK]<sop><|user|>\nQ1<|assistant|>\n<think></think>\nA1"
        "<|user|>\nQ2<|assistant|>\n<think>new thoughts</think>\nA2"
    )


def test_openai_message_shapes_render():
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]},
        {"role": "assistant", "content": None, "reasoning": "r", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "北京"}'}}]},
        {"role": "tool", "content": "晴"},
    ]
    assert render(messages, tools=[WEATHER_TOOL]).endswith(
        "<|user|>\nHi there<|assistant|>\n<think>r</think>\n<tool_call>get_weather\n"
        "<arg_key>city</arg_key>\n<arg_value>北京</arg_value>\n</tool_call>"
        "<|observation|>\n<tool_response>\n晴\n</tool_response><|assistant|>"
    )
    assert messages[1]["tool_calls"][0]["function"]["arguments"] == '{"city": "北京"}'  # caller's copy untouched


def test_tool_schemas_keep_non_ascii_and_html_characters():
    tool = {"type": "function", "function": {"name": "search", "description": "搜索 <web> & 'docs'"}}
    rendered = render([{"role": "user", "content": "x"}], tools=[tool])
    expected_line = '{"type": "function", "function": {"name": "search", "description": "搜索 <web> & \'docs\'"}}\n'
    assert expected_line in rendered


@pytest.mark.parametrize("arguments, problem", [('{"city": "Bei', "not valid JSON"), ("[1, 2]", "JSON object")])
def test_bad_tool_call_arguments_name_the_message(arguments, problem):
    messages = [
        {"role": "user", "content": "x"},
        {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": arguments}}]},
    ]
    where = r"messages\[1\]\.tool_calls\[0\]\.function\.arguments"
    with pytest.raises(ValueError, match=rf"{where} .*{problem}"):
        render(messages)


def test_unknown_role_is_a_clear_error():
    with pytest.raises(jinja2.TemplateError, match="Unsupported message role 'critic'"):
        render([{"role": "critic", "content": "x"}])


def test_templates_run_sandboxed():
    with pytest.raises(jinja2.exceptions.SecurityError):
        render_chat_template("{{ messages.__class__.__init__.__globals__ }}", [])
    assert render_chat_template("{{ {'a': '<b>'} | tojson(indent=1) }}", []) == '{\n "a": "<b>"\n}'


def test_transformers_renders_the_same_prompt(tmp_path):
    transformers = pytest.importorskip("transformers")
    write_tokenizer_files(tmp_path, 1024)
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    tok = Tokenizer.from_pretrained(tmp_path)
    messages = CONVERSATION_C + [
        {"role": "assistant", "content": "<think>It is sunny.</think>Sunny, 26°C."},
        {"role": "user", "content": "And Shanghai?"},
    ]
    for kwargs in ({}, {"enable_thinking": False}, {"enable_thinking": True}):
        ours = tok.apply_chat_template(messages, tools=[WEATHER_TOOL], **kwargs)
        theirs = hf_tok.apply_chat_template(
            messages, tools=[WEATHER_TOOL], tokenize=False, add_generation_prompt=True, **kwargs)
        assert ours == theirs
        assert tok.encode_chat(messages, tools=[WEATHER_TOOL], **kwargs) == hf_tok.encode(
            theirs, add_special_tokens=False)


def test_chat_template_jinja_takes_precedence(tmp_path):
    write_tokenizer_files(tmp_path, 1024)
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}[{{ m.content }}]{% endfor %}")
    tok = Tokenizer.from_pretrained(tmp_path)
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "[hi]"


def test_named_template_list_uses_default(tmp_path):
    config = {"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    assert find_chat_template(tmp_path) == "D"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": [{"name": "rag", "template": "R"}]}))
    with pytest.raises(ValueError, match="none is named 'default'"):
        find_chat_template(tmp_path)


def test_missing_template_is_a_clear_error(tmp_path):
    write_tokenizer_files(tmp_path, 1024)
    config_file = tmp_path / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    del config["chat_template"]
    config_file.write_text(json.dumps(config))
    with pytest.raises(FileNotFoundError, match="no chat template found"):
        load_chat_template(tmp_path)
    tok = Tokenizer.from_pretrained(tmp_path)  # plain encoding still works without a template
    assert tok.decode(tok.encode("hi")) == "hi"
    with pytest.raises(ValueError, match="chat_template.jinja"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
