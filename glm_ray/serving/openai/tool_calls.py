"""Parse GLM-4.5/4.6 tool calls from the content part of a completion, and validate tool requests.

Format (spec 4.3): `<tool_call>NAME\\n<arg_key>K</arg_key>\\n<arg_value>V</arg_value>\\n...</tool_call>`,
parallel calls back to back. `parse_tool_calls` is the plain reference; `ToolCallStream` is the
incremental version, and tests hold them equal however the text is cut into deltas. Shared rules:

- content: the text before the first `<tool_call>`, trailing whitespace removed, None if empty.
  Text between and after calls is dropped, as vLLM does (GLM only puts `\\n` there).
- a call's body runs to the first `</tool_call>`. Name: the body up to the first `\\n` or `<arg_key>`,
  stripped; a call with an empty name is skipped. A call never closed (output cut by max_tokens) is
  dropped by `parse_tool_calls`; the stream cannot take back what it already sent, so it just stops:
  the client sees unterminated arguments next to finish_reason "length", never a call that looks
  complete but is not.
- an argument: `<arg_key>K</arg_key>`, optional whitespace, `<arg_value>V</arg_value>`; K stripped,
  V verbatim. A value still open at `</tool_call>` ends there. Other text in the body is ignored.
- typing (`decode_value`) follows the request's JSON schema for the parameter.
- arguments JSON: `{"k": v, ...}` in order of appearance, spaced like json.dumps(ensure_ascii=False);
  a repeated key is written twice (json.loads keeps the last), as the stream cannot undo the first.
  The stream sends `{` with the name, each argument when its value closes (a value typed only
  `string` streams as it arrives, JSON-escaped), and `}` at `</tool_call>`.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from glm_ray.serving.openai.reasoning import partial_tag_len

CALL_START, CALL_END = "<tool_call>", "</tool_call>"
KEY_START, KEY_END = "<arg_key>", "</arg_key>"
VALUE_START, VALUE_END = "<arg_value>", "</arg_value>"

_JSON_TYPES: dict[str, Callable[[Any], bool]] = {
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "array": lambda v: isinstance(v, list),
    "object": lambda v: isinstance(v, dict),
    "null": lambda v: v is None,
}
_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_STRING_ONLY = frozenset({"string"})


@dataclass(frozen=True)
class ParsedCall:
    name: str
    arguments_json: str


@dataclass(frozen=True)
class ContentDelta:
    text: str


@dataclass(frozen=True)
class ToolCallStart:
    index: int
    id: str
    name: str


@dataclass(frozen=True)
class ToolCallArgsDelta:
    index: int
    fragment: str


Event = ContentDelta | ToolCallStart | ToolCallArgsDelta


def make_tool_call_id() -> str:
    return "call_" + secrets.token_hex(12)


def param_types(tools: list[dict] | None, name: str, key: str) -> frozenset[str] | None:
    """JSON types the schema allows for argument `key` of function `name` (`type`, type lists,
    and the `type`s of anyOf/oneOf members); None when the schema says nothing."""
    for tool in tools or ():
        function = tool.get("function") if isinstance(tool, dict) else None
        if isinstance(function, dict) and function.get("name") == name:
            properties = (function.get("parameters") or {}).get("properties") or {}
            schema = properties.get(key) if isinstance(properties, dict) else None
            if not isinstance(schema, dict):
                return None
            types: set[str] = set()
            for sub in [schema, *schema.get("anyOf", ()), *schema.get("oneOf", ())]:
                declared = sub.get("type") if isinstance(sub, dict) else None
                types.update([declared] if isinstance(declared, str) else declared or ())
            return frozenset(types) or None
    return None


def decode_value(raw: str, types: frozenset[str] | None) -> Any:
    """Type one `<arg_value>` text. Schema type exactly `string`: the raw text, even if it looks
    like a number. Otherwise json.loads (NaN/Infinity refused), falling back to the raw text; when
    `string` is one of several types, the decoded value is kept only if it is of another listed
    type (["string", "integer"]: "12" -> 12, "abc" -> "abc", "[1]" -> "[1]")."""
    if types == _STRING_ONLY:
        return raw
    try:
        value = json.loads(raw, parse_constant=_refuse)
    except ValueError:
        return raw
    others = types - _STRING_ONLY if types and "string" in types else None
    if others is not None and not any(_JSON_TYPES.get(t, lambda v: False)(value) for t in others):
        return raw
    return value


def _refuse(constant: str) -> Any:
    raise ValueError(f"{constant} is not JSON")


def _pair_json(key: str, value_json: str, first: bool) -> str:
    return ("" if first else ", ") + json.dumps(key, ensure_ascii=False) + ": " + value_json


def _find_first(text: str, tags: tuple[str, ...]) -> tuple[int, str]:
    found = [(i, tag) for tag in tags if (i := text.find(tag)) >= 0]
    return min(found) if found else (-1, "")


def parse_tool_calls(text: str, tools: list[dict] | None = None) -> tuple[str | None, list[ParsedCall]]:
    """Split a whole content text into (content, tool calls)."""
    first = text.find(CALL_START)
    calls = []
    start = first
    while start >= 0:
        end = text.find(CALL_END, start)
        if end < 0:
            break  # cut short: dropped
        call = _parse_call(text[start + len(CALL_START):end], tools)
        if call is not None:
            calls.append(call)
        start = text.find(CALL_START, end + len(CALL_END))
    content = text if first < 0 else text[:first]
    return content.rstrip() or None, calls


def _parse_call(body: str, tools: list[dict] | None) -> ParsedCall | None:
    cut = _find_first(body, ("\n", KEY_START))[0]
    cut = len(body) if cut < 0 else cut
    name = body[:cut].strip()
    if not name:
        return None
    pairs, pos = [], cut
    while (key_start := body.find(KEY_START, pos)) >= 0:
        key_end = body.find(KEY_END, key_start + len(KEY_START))
        if key_end < 0:
            break
        key = body[key_start + len(KEY_START):key_end].strip()
        pos = key_end + len(KEY_END)
        after_key = body[pos:].lstrip()
        if not after_key.startswith(VALUE_START):
            continue
        value_start = len(body) - len(after_key) + len(VALUE_START)
        value_end = body.find(VALUE_END, value_start)
        value_end = len(body) if value_end < 0 else value_end
        value = decode_value(body[value_start:value_end], param_types(tools, name, key))
        pairs.append(_pair_json(key, json.dumps(value, ensure_ascii=False), first=not pairs))
        pos = value_end + len(VALUE_END)
    return ParsedCall(name, "{" + "".join(pairs) + "}")


_TEXT, _NAME_STATE, _ARGS, _KEY, _AFTER_KEY, _VALUE = "text", "name", "args", "key", "after_key", "value"


class ToolCallStream:
    """Incremental `parse_tool_calls`: feed content deltas, get events back. Text that may still be
    the start of a tag (`<tool_`, `</arg_val`) is held back until it is known not to be one."""

    def __init__(self, tools: list[dict] | None = None, id_factory: Callable[[], str] = make_tool_call_id):
        self._tools = tools
        self._id_factory = id_factory
        self._state = _TEXT
        self._pending = ""
        self._seen_call = False  # once a call opened, text outside calls is dropped
        self._num_calls = 0
        self._index: int | None = None  # index of the call being sent; None when it is skipped
        self._name = self._key = self._value = ""
        self._types: frozenset[str] | None = None
        self._num_pairs = 0
        self._events: list[Event] = []

    def feed(self, delta_text: str) -> list[Event]:
        self._pending += delta_text
        while self._step():
            pass
        return self._take_events()

    def finish(self) -> list[Event]:
        """End of output: unsent content is flushed; a call left open is abandoned (see module doc)."""
        if self._state == _TEXT and not self._seen_call:
            self._content(self._pending.rstrip())
        self._pending = ""
        return self._take_events()

    def _step(self) -> bool:
        """Consume what the buffered text decides; False when more text is needed."""
        text = self._pending
        if self._state == _TEXT:
            at, _ = _find_first(text, (CALL_START,))
            if at < 0:
                ready = text[:len(text) - partial_tag_len(text, (CALL_START,))]
                if self._seen_call:
                    self._pending = text[len(ready):]
                else:  # trailing whitespace is held too: it is dropped if a call follows
                    self._content(ready.rstrip())
                    self._pending = text[len(ready.rstrip()):]
                return False
            if not self._seen_call:
                self._content(text[:at].rstrip())
            self._seen_call = True
            return self._advance(at + len(CALL_START), _NAME_STATE)
        if self._state == _NAME_STATE:
            at, tag = _find_first(text, ("\n", KEY_START, CALL_END))
            if at < 0:
                return False
            self._name = text[:at].strip()
            self._index = None
            if self._name:
                self._index, self._num_calls, self._num_pairs = self._num_calls, self._num_calls + 1, 0
                self._events.append(ToolCallStart(self._index, self._id_factory(), self._name))
                self._args("{")
            return self._advance(at + (tag == "\n"), _ARGS)  # a tag is left for _ARGS to read
        if self._state == _ARGS:
            at, tag = _find_first(text, (KEY_START, CALL_END))
            if at < 0:
                self._pending = text[len(text) - partial_tag_len(text, (KEY_START, CALL_END)):]
                return False
            if tag == CALL_END:
                return self._close_call(at + len(CALL_END))
            return self._advance(at + len(KEY_START), _KEY)
        if self._state == _KEY:
            at, tag = _find_first(text, (KEY_END, CALL_END))
            if at < 0:
                return False
            if tag == CALL_END:
                return self._close_call(at + len(CALL_END))
            self._key = text[:at].strip()
            return self._advance(at + len(KEY_END), _AFTER_KEY)
        if self._state == _AFTER_KEY:
            after_key = text.lstrip()
            if after_key.startswith(VALUE_START):
                self._types = param_types(self._tools, self._name, self._key)
                self._value = ""
                if self._types == _STRING_ONLY:
                    self._args(_pair_json(self._key, '"', first=not self._num_pairs))
                return self._advance(len(text) - len(after_key) + len(VALUE_START), _VALUE)
            if VALUE_START.startswith(after_key):
                return False
            self._state = _ARGS  # not a value after all: rescan this text for the next key
            return True
        at, tag = _find_first(text, (VALUE_END, CALL_END))
        raw = text if at < 0 else text[:at]
        if at < 0:
            raw = raw[:len(raw) - partial_tag_len(raw, (VALUE_END, CALL_END))]
        if self._types == _STRING_ONLY:
            self._args(json.dumps(raw, ensure_ascii=False)[1:-1] + ('"' if at >= 0 else ""))
        else:
            self._value += raw
        if at < 0:
            self._pending = text[len(raw):]
            return False
        if self._types != _STRING_ONLY:
            value_json = json.dumps(decode_value(self._value, self._types), ensure_ascii=False)
            self._args(_pair_json(self._key, value_json, first=not self._num_pairs))
        self._num_pairs += 1
        if tag == CALL_END:
            return self._close_call(at + len(CALL_END))
        return self._advance(at + len(VALUE_END), _ARGS)

    def _advance(self, consumed: int, state: str) -> bool:
        self._pending = self._pending[consumed:]
        self._state = state
        return True

    def _close_call(self, consumed: int) -> bool:
        self._args("}")
        self._index = None
        return self._advance(consumed, _TEXT)

    def _content(self, text: str) -> None:
        if text:
            self._events.append(ContentDelta(text))

    def _args(self, fragment: str) -> None:
        if self._index is not None and fragment:
            self._events.append(ToolCallArgsDelta(self._index, fragment))

    def _take_events(self) -> list[Event]:
        """Hand out this step's events, merging neighbours of the same kind (fewer, larger chunks)."""
        merged: list[Event] = []
        for event in self._events:
            last = merged[-1] if merged else None
            if isinstance(event, ContentDelta) and isinstance(last, ContentDelta):
                merged[-1] = ContentDelta(last.text + event.text)
            elif isinstance(event, ToolCallArgsDelta) and isinstance(last, ToolCallArgsDelta) \
                    and last.index == event.index:
                merged[-1] = ToolCallArgsDelta(event.index, last.fragment + event.fragment)
            else:
                merged.append(event)
        self._events = []
        return merged


def validate_tools(tools: Any) -> None:
    """Reject malformed OpenAI `tools` at the request edge, naming the bad field."""
    if tools is None:
        return
    if not isinstance(tools, list):
        raise ValueError(f"tools must be a list of tool objects, got {type(tools).__name__}")
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise ValueError(f'{where}.type must be "function"')
        function = tool.get("function")
        if not isinstance(function, dict):
            raise ValueError(f"{where}.function must be an object with a name")
        name = function.get("name")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ValueError(f"{where}.function.name must be a non-empty string of letters, digits, "
                             f"'_', '.' or '-', got {name!r}")
        if not isinstance(function.get("description", ""), str):
            raise ValueError(f"{where}.function.description must be a string")
        parameters = function.get("parameters")
        if parameters is not None and (not isinstance(parameters, dict) or parameters.get("type") != "object"):
            raise ValueError(f'{where}.function.parameters must be a JSON schema with "type": "object"')
        if parameters is not None and not isinstance(parameters.get("properties", {}), dict):
            raise ValueError(f"{where}.function.parameters.properties must be an object")


def validate_tool_choice(tool_choice: Any, tools: list[dict] | None) -> None:
    """Accept None, "none", "auto", "required" (needs tools) or a named function that is in `tools`
    (which must have passed `validate_tools`)."""
    names = [t.get("function", {}).get("name") for t in tools or () if isinstance(t, dict)]
    if tool_choice is None or tool_choice in ("none", "auto"):
        return
    if tool_choice == "required":
        if not names:
            raise ValueError('tool_choice "required" needs at least one tool in `tools`')
        return
    if isinstance(tool_choice, str):
        raise ValueError(f'tool_choice must be "none", "auto", "required" or a function object, got {tool_choice!r}')
    function = tool_choice.get("function") if isinstance(tool_choice, dict) else None
    if not isinstance(function, dict) or tool_choice.get("type") != "function":
        raise ValueError('tool_choice object must be {"type": "function", "function": {"name": ...}}')
    if function.get("name") not in names:
        raise ValueError(f"tool_choice names function {function.get('name')!r}, which is not in `tools` "
                         f"(available: {names})")
