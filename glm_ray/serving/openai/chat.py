"""POST /v1/chat/completions: render the GLM chat template, generate, split the output into
reasoning, content and tool calls (whole with `split`/`parse_tool_calls`, streamed with their
incremental twins)."""

from __future__ import annotations

import asyncio
import time

import jinja2
from fastapi.responses import JSONResponse, StreamingResponse

from glm_ray.serving.openai.completions import token_text
from glm_ray.serving.openai.errors import OpenAIError, from_exception
from glm_ray.serving.openai.reasoning import ReasoningStream, split, thinking_enabled
from glm_ray.serving.openai.sampling import (check_common, check_length, make_request, new_id, sampling_dict,
                                             usage)
from glm_ray.serving.openai.schemas import ChatCompletionRequest
from glm_ray.serving.openai.streams import DONE, SseChunks, merge, open_streams, sse
from glm_ray.serving.openai.tool_calls import (ContentDelta, ToolCallArgsDelta, ToolCallStart, ToolCallStream,
                                               make_tool_call_id, parse_tool_calls, validate_tool_choice,
                                               validate_tools)

ROLES = ("system", "developer", "user", "assistant", "tool")


def _messages(body: ChatCompletionRequest) -> list[dict]:
    """OpenAI messages -> the dicts the chat template reads (text parts joined, developer = system)."""
    out = []
    for i, m in enumerate(body.messages):
        where = f"messages[{i}]"
        if m.role not in ROLES:
            raise OpenAIError(400, f"{where}.role must be one of {', '.join(ROLES)}; got {m.role!r}",
                              param=f"{where}.role")
        content = m.content if not isinstance(m.content, list) else "\n".join(p.text for p in m.content)
        if content is None and not (m.role == "assistant" and m.tool_calls):
            raise OpenAIError(400, f"{where}.content is missing: a {m.role} message needs text",
                              param=f"{where}.content")
        message = {"role": "system" if m.role == "developer" else m.role, "content": content,
                   "name": m.name, "tool_call_id": m.tool_call_id, "reasoning_content": m.reasoning_content}
        if m.tool_calls:
            message["tool_calls"] = [{"id": c.id, "type": "function",
                                      "function": {"name": c.function.name, "arguments": c.function.arguments}}
                                     for c in m.tool_calls]
        out.append({k: v for k, v in message.items() if v is not None})
    return out


def _render(body: ChatCompletionRequest, tokenizer) -> str:
    try:
        validate_tools(body.tools)
    except ValueError as e:
        raise OpenAIError(400, str(e), param="tools") from None
    try:
        validate_tool_choice(body.tool_choice, body.tools)
    except ValueError as e:
        raise OpenAIError(400, str(e), param="tool_choice") from None
    kwargs = dict(body.chat_template_kwargs or {})
    for reserved in ("messages", "tools", "add_generation_prompt"):
        if reserved in kwargs:
            raise OpenAIError(400, f"chat_template_kwargs cannot set {reserved!r}", param="chat_template_kwargs")
    try:
        return tokenizer.apply_chat_template(_messages(body), tools=body.tools or None, **kwargs)
    except (ValueError, TypeError, jinja2.TemplateError) as e:
        raise OpenAIError(400, f"the conversation cannot be rendered: {e}", param="messages") from None


def _logprobs(tokenizer, token_ids: list[int], entries: list[dict] | None, num_top: int) -> list[dict]:
    """Chat-format logprobs entries: token, logprob, bytes, top_logprobs."""
    def item(token_id, entry):
        text = token_text(tokenizer, token_id, entry)
        return {"token": text, "logprob": entry["logprob"], "bytes": list(text.encode("utf-8"))}

    out = []
    for token_id, entry in zip(token_ids, entries or []):
        top = sorted(((tid, e) for tid, e in entry.items() if e["rank"] <= num_top), key=lambda kv: kv[1]["rank"])
        out.append({**item(token_id, entry[str(token_id)]), "top_logprobs": [item(tid, e) for tid, e in top]})
    return out


class ChatSetup:
    """What a chat request resolves to before generation."""

    def __init__(self, body: ChatCompletionRequest, backend):
        check_common(body, backend)
        if body.top_logprobs is not None and not body.logprobs:
            raise OpenAIError(400, "top_logprobs needs logprobs set to true", param="top_logprobs")
        self.prompt = _render(body, backend.tokenizer)
        self.prompt_ids = backend.tokenizer.encode(self.prompt)
        self.thinking = thinking_enabled(self.prompt)
        self.tools = body.tools if body.tools and body.tool_choice != "none" else None
        self.parallel = body.parallel_tool_calls
        self.num_top = body.top_logprobs or 0
        param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        max_tokens = body.max_completion_tokens or body.max_tokens
        if max_tokens is None:
            max_tokens = min(backend.max_output_tokens, backend.max_model_len - len(self.prompt_ids))
            if max_tokens < 1:
                raise OpenAIError(400, f"the prompt has {len(self.prompt_ids)} tokens, which fills this model's "
                                       f"maximum context length of {backend.max_model_len}", param="messages")
        check_length(backend, len(self.prompt_ids), max_tokens, param)
        self.params = sampling_dict(body, max_tokens, logprobs=self.num_top if body.logprobs else None)


async def start_chat(body: ChatCompletionRequest, backend, metrics, stream: bool = True) -> tuple[ChatSetup, str, list]:
    """Validate, render and start one chat request: (setup, id, streams). Raises OpenAIError
    before anything is sent when the request is bad or cannot be served. stream=False: the
    backend hands the output over in one piece."""
    arrival = time.monotonic()
    # rendering and tokenizing a long conversation takes a while: off the event loop, which other
    # requests' streams share
    setup = await asyncio.to_thread(ChatSetup, body, backend)
    chat_id = new_id("chatcmpl")
    request = make_request(chat_id, setup.prompt_ids, setup.params, setup.prompt, stream=stream)
    return setup, chat_id, await open_streams(backend, [request], metrics, arrival)


async def create_chat_completion(body: ChatCompletionRequest, backend, metrics) -> JSONResponse | StreamingResponse:
    setup, chat_id, streams = await start_chat(body, backend, metrics, stream=bool(body.stream))
    head = {"id": chat_id, "object": "chat.completion", "created": int(time.time()), "model": body.model}
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        head["object"] = "chat.completion.chunk"
        return StreamingResponse(_stream(head, streams, setup, body, backend.tokenizer, include_usage),
                                 media_type="text/event-stream")
    return JSONResponse(await _collect(head, streams, setup, body, backend.tokenizer))


async def _collect(head, streams, setup: ChatSetup, body, tokenizer) -> dict:
    text, token_ids, entries, last = "", [], [], None
    async for _, delta in merge(streams):
        text += delta["text"]
        token_ids += delta["token_ids"]
        entries += delta["logprobs"] or []
        last = delta
    reasoning, content = split(text, setup.thinking)
    calls = []
    if setup.tools is not None and content:
        content, calls = parse_tool_calls(content, setup.tools)
        calls = calls if setup.parallel else calls[:1]
    finish_reason = "tool_calls" if calls and last["finish_reason"] == "stop" else last["finish_reason"]
    message = {"role": "assistant", "content": content, "reasoning_content": reasoning,
               "tool_calls": [{"id": make_tool_call_id(), "type": "function",
                               "function": {"name": c.name, "arguments": c.arguments_json}} for c in calls]}
    logprobs = {"content": _logprobs(tokenizer, token_ids, entries, setup.num_top)} if body.logprobs else None
    choice = {"index": 0, "message": message, "logprobs": logprobs, "finish_reason": finish_reason,
              "stop_reason": last["stop_reason"]}
    return {**head, "choices": [choice], "usage": usage(len(setup.prompt_ids), last["num_output_tokens"])}


class _StreamParser:
    """Text deltas -> OpenAI chat `delta` objects (reasoning_content, content, tool_calls)."""

    def __init__(self, setup: ChatSetup):
        self.reasoning = ReasoningStream(setup.thinking)
        self.calls = ToolCallStream(setup.tools) if setup.tools is not None else None
        self.parallel = setup.parallel
        self.num_calls = 0

    def feed(self, text: str) -> dict:
        return self._delta(*self.reasoning.feed(text), final=False)

    def finish(self) -> dict:
        return self._delta(*self.reasoning.finish(), final=True)

    def _delta(self, reasoning: str, content: str, final: bool) -> dict:
        delta = {"reasoning_content": reasoning} if reasoning else {}
        if self.calls is None:
            return {**delta, "content": content} if content else delta
        events = (self.calls.feed(content) if content else []) + (self.calls.finish() if final else [])
        text = "".join(e.text for e in events if isinstance(e, ContentDelta))
        if text:
            delta["content"] = text
        tool_calls: list[dict] = []
        for e in events:
            if isinstance(e, ContentDelta) or (not self.parallel and e.index > 0):
                continue
            if isinstance(e, ToolCallStart):
                self.num_calls += 1
                tool_calls.append({"index": e.index, "id": e.id, "type": "function",
                                   "function": {"name": e.name, "arguments": ""}})
            elif isinstance(e, ToolCallArgsDelta):
                if tool_calls and tool_calls[-1]["index"] == e.index:
                    tool_calls[-1]["function"]["arguments"] += e.fragment
                else:
                    tool_calls.append({"index": e.index, "function": {"arguments": e.fragment}})
        if tool_calls:
            delta["tool_calls"] = tool_calls
        return delta


async def chat_events(streams, setup: ChatSetup):
    """The transport-neutral chat stream: per backend delta, {"delta": OpenAI chat delta (maybe
    empty), "token_ids", "entries" (raw logprob entries or None), "finish_reason", "stop_reason",
    "num_output_tokens"}; the finishing delta's "delta" also flushes what the parsers held back."""
    parser = _StreamParser(setup)
    async for _, d in merge(streams):
        delta = parser.feed(d["text"])
        finish_reason = d["finish_reason"]
        if finish_reason is not None:
            delta = _joined(delta, parser.finish())
            if parser.num_calls and finish_reason == "stop":
                finish_reason = "tool_calls"
        yield {"delta": delta, "token_ids": d["token_ids"], "entries": d["logprobs"],
               "finish_reason": finish_reason, "stop_reason": d["stop_reason"],
               "num_output_tokens": d["num_output_tokens"]}


def _joined(a: dict, b: dict) -> dict:
    """Two consecutive chat deltas as one."""
    out = dict(a)
    for key in ("reasoning_content", "content"):
        if key in b:
            out[key] = out.get(key, "") + b[key]
    if "tool_calls" in b:
        out["tool_calls"] = out.get("tool_calls", []) + b["tool_calls"]
    return out


async def _stream(head, streams, setup: ChatSetup, body, tokenizer, include_usage: bool):
    chunks = SseChunks(head)

    def chunk(delta: dict, logprobs=None, finish_reason=None, stop_reason=None) -> str:
        choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        if finish_reason is not None:
            choice["stop_reason"] = stop_reason
        return chunks.chunk(choices=[choice])

    num_output_tokens = 0
    try:
        yield chunk({"role": "assistant", "content": ""})
        async for e in chat_events(streams, setup):
            num_output_tokens = e["num_output_tokens"]
            logprobs = {"content": _logprobs(tokenizer, e["token_ids"], e["entries"], setup.num_top)} \
                if body.logprobs and e["token_ids"] else None
            if e["finish_reason"] is not None:
                yield chunk(e["delta"], logprobs, e["finish_reason"], e["stop_reason"])
            elif e["delta"] or logprobs:
                yield chunk(e["delta"], logprobs)
        if include_usage:
            yield chunks.chunk(choices=[], usage=usage(len(setup.prompt_ids), num_output_tokens))
    except Exception as e:  # the status line is sent: report in the stream, then end it
        yield sse(from_exception(e).body())
    yield DONE
