"""Find and render Jinja chat templates the way transformers does.

Templates come from model repos, so they are untrusted code: they run in an immutable sandbox with
the same helpers transformers exposes (`tojson` with ensure_ascii/indent, `raise_exception`,
`strftime_now`), with trim_blocks and lstrip_blocks on, so a template renders identically here and in
`AutoTokenizer.apply_chat_template`.
"""

from __future__ import annotations

import copy
import functools
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"

# Older clients name a message's reasoning differently; templates read `reasoning_content`.
_REASONING_ALIASES = ("reasoning", "thinking")


def find_chat_template(model_dir: str | Path) -> str | None:
    """The model's chat template: `chat_template.jinja` first, then tokenizer_config.json's
    `chat_template` (a string, or a list of {name, template} from which "default" is taken).
    None if the model has neither."""
    model_dir = Path(model_dir)
    template_file = model_dir / TEMPLATE_FILE
    if template_file.is_file():
        return template_file.read_text(encoding="utf-8")
    config_file = model_dir / TOKENIZER_CONFIG_FILE
    if not config_file.is_file():
        return None
    template = json.loads(config_file.read_text(encoding="utf-8")).get("chat_template")
    if template is None or isinstance(template, str):
        return template
    if isinstance(template, list):
        named = {entry.get("name"): entry.get("template") for entry in template if isinstance(entry, Mapping)}
        if "default" in named:
            return named["default"]
        raise ValueError(
            f"{config_file}: chat_template is a list of named templates {sorted(map(str, named))} "
            "but none is named 'default'; add a 'default' entry or a chat_template.jinja file"
        )
    raise ValueError(f"{config_file}: chat_template must be a string or a list of {{name, template}}")


def load_chat_template(model_dir: str | Path) -> str:
    """Like `find_chat_template`, but a model without a template is an error."""
    template = find_chat_template(model_dir)
    if template is None:
        raise FileNotFoundError(missing_template_message(model_dir))
    return template


def missing_template_message(model_dir: str | Path | None) -> str:
    where = f"in {model_dir}" if model_dir is not None else "for this tokenizer"
    return (
        f"no chat template found {where}: add a {TEMPLATE_FILE} file or a 'chat_template' entry to "
        f"{TOKENIZER_CONFIG_FILE} (glm_ray.tokenizer.DEFAULT_CHAT_TEMPLATE renders the GLM-4.5/4.6 format)"
    )


class _GenerationTag(jinja2.ext.Extension):
    """Accept `{% generation %}...{% endgeneration %}` (used by HF training templates) as a no-op."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.CallBlock:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Jinja's built-in tojson HTML-escapes `<`, `>`, `&` and `'`; chat templates need plain JSON.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=16)
def compile_chat_template(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(template)


def _decode_arguments(arguments: Any, where: str) -> Any:
    if not isinstance(arguments, str):
        return arguments
    try:
        decoded = json.loads(arguments) if arguments.strip() else {}
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where} is not valid JSON ({exc.msg} at char {exc.pos}): {arguments!r}") from None
    if not isinstance(decoded, dict):
        raise ValueError(f"{where} must be a JSON object of argument names to values, got {arguments!r}")
    return decoded


def prepare_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Copy messages into the shape GLM-style templates expect.

    Keys set to None are dropped (OpenAI clients send `content: null` with tool calls), reasoning
    aliases fill `reasoning_content`, and OpenAI tool-call arguments given as a JSON string are
    decoded to a dict, because the template renders one <arg_key>/<arg_value> pair per argument.
    """
    prepared = []
    for index, message in enumerate(messages):
        if hasattr(message, "model_dump"):
            message = message.model_dump()
        if not isinstance(message, Mapping):
            raise TypeError(f"messages[{index}] must be a mapping with a 'role', got {type(message).__name__}")
        message = {key: copy.deepcopy(value) for key, value in message.items() if value is not None}
        if "reasoning_content" not in message:
            for alias in _REASONING_ALIASES:
                if isinstance(message.get(alias), str):
                    message["reasoning_content"] = message[alias]
                    break
        for call_index, tool_call in enumerate(message.get("tool_calls") or []):
            where = f"messages[{index}].tool_calls[{call_index}]"
            if isinstance(tool_call.get("function"), Mapping):
                function = tool_call["function"]
                function["arguments"] = _decode_arguments(function.get("arguments"), f"{where}.function.arguments")
            elif "arguments" in tool_call:
                tool_call["arguments"] = _decode_arguments(tool_call["arguments"], f"{where}.arguments")
        prepared.append(message)
    return prepared


def render_chat_template(
    template: str,
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]] | None = None,
    add_generation_prompt: bool = True,
    **template_kwargs: Any,
) -> str:
    """Render `messages` (and optional OpenAI-style `tools`) with a chat template string.

    `template_kwargs` become template variables, e.g. `enable_thinking=False`.
    """
    compiled = compile_chat_template(template)
    return compiled.render(
        messages=prepare_messages(messages),
        tools=[dict(tool) for tool in tools] if tools is not None else None,
        add_generation_prompt=add_generation_prompt,
        **template_kwargs,
    )
