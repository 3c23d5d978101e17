"""POST /v1/completions: prompts in, text (and OpenAI-format logprobs) out, whole or streamed."""

from __future__ import annotations

import asyncio
import time

from fastapi.responses import JSONResponse, StreamingResponse

from glm_ray.serving.openai.errors import OpenAIError, from_exception
from glm_ray.serving.openai.sampling import (check_common, check_length, make_request, new_id, sampling_dict,
                                             usage)
from glm_ray.serving.openai.schemas import DEFAULT_MAX_TOKENS, CompletionRequest
from glm_ray.serving.openai.streams import DONE, SseChunks, merge, open_streams, sse


def token_text(tokenizer, token_id: int | str, entry: dict | None = None) -> str:
    if entry is not None and entry.get("decoded_token") is not None:
        return entry["decoded_token"]
    return tokenizer.decode([int(token_id)], skip_special_tokens=False)


class CompletionLogprobs:
    """OpenAI completions logprobs: tokens, token_logprobs, top_logprobs, text_offset."""

    def __init__(self, tokenizer, offset: int = 0):
        self.tokenizer = tokenizer
        self.offset = offset
        self.tokens, self.token_logprobs, self.top_logprobs, self.text_offset = [], [], [], []

    def add(self, token_ids: list[int], entries: list[dict | None]) -> None:
        for token_id, entry in zip(token_ids, entries):
            chosen = (entry or {}).get(str(token_id))
            text = token_text(self.tokenizer, token_id, chosen)
            self.tokens.append(text)
            self.token_logprobs.append(chosen["logprob"] if chosen else None)
            self.top_logprobs.append(None if entry is None else {
                token_text(self.tokenizer, tid, e): e["logprob"]
                for tid, e in sorted(entry.items(), key=lambda kv: kv[1]["rank"])})
            self.text_offset.append(self.offset)
            self.offset += len(text)

    def take(self) -> dict:
        """The entries so far, and start afresh (one streamed chunk's worth)."""
        out = self.to_dict()
        self.tokens, self.token_logprobs, self.top_logprobs, self.text_offset = [], [], [], []
        return out

    def to_dict(self) -> dict:
        return {"tokens": self.tokens, "token_logprobs": self.token_logprobs, "top_logprobs": self.top_logprobs,
                "text_offset": self.text_offset}


MAX_TOKEN_ID = 1 << 31


def prompts_of(body: CompletionRequest, tokenizer) -> list[tuple[list[int], str]]:
    prompt = body.prompt
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise OpenAIError(400, "prompt must not be empty", param="prompt")
    if all(isinstance(p, int) for p in prompt):
        prompt = [prompt]
    out = []
    for i, p in enumerate(prompt):
        ids = tokenizer.encode(p) if isinstance(p, str) else list(p)
        if not ids:
            raise OpenAIError(400, f"prompt {i} is empty: give at least one token", param="prompt")
        bad = next((t for t in ids if not 0 <= t < MAX_TOKEN_ID), None)  # the engine checks the model's vocab;
        if bad is not None:  # this keeps ids the tokenizer cannot even hold (u32) away from its decode
            raise OpenAIError(400, f"prompt token id {bad} is outside the vocabulary", param="prompt")
        text = p if isinstance(p, str) else tokenizer.decode(ids, skip_special_tokens=False)
        out.append((ids, text))
    return out


async def create_completion(body: CompletionRequest, backend, metrics) -> JSONResponse | StreamingResponse:
    arrival = time.monotonic()
    check_common(body, backend)
    if body.best_of not in (None, 1):
        raise OpenAIError(400, f"best_of must be 1, got {body.best_of}", param="best_of")
    if body.suffix:
        raise OpenAIError(400, "suffix is not supported", param="suffix")
    prompts = await asyncio.to_thread(prompts_of, body, backend.tokenizer)  # off the event loop: see chat.py
    max_tokens = DEFAULT_MAX_TOKENS if body.max_tokens is None else body.max_tokens
    for ids, _ in prompts:
        check_length(backend, len(ids), max_tokens)
    params = sampling_dict(body, max_tokens, logprobs=body.logprobs,
                           prompt_logprobs=body.logprobs if body.echo else None)
    completion_id = new_id("cmpl")
    requests = [make_request(f"{completion_id}-{i}", ids, params, text, stream=bool(body.stream))
                for i, (ids, text) in enumerate(prompts)]
    streams = await open_streams(backend, requests, metrics, arrival)
    head = {"id": completion_id, "object": "text_completion", "created": int(time.time()), "model": body.model}
    num_prompt_tokens = sum(len(ids) for ids, _ in prompts)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        events = _stream(head, streams, prompts, body, backend.tokenizer, num_prompt_tokens, include_usage)
        return StreamingResponse(events, media_type="text/event-stream")
    return JSONResponse(await _collect(head, streams, prompts, body, backend.tokenizer, num_prompt_tokens))


class _Choice:
    def __init__(self, index: int, prompt_ids: list[int], prompt_text: str, body: CompletionRequest, tokenizer):
        self.index = index
        self.prompt_ids = prompt_ids
        self.echo = prompt_text if body.echo else ""
        self.logprobs = CompletionLogprobs(tokenizer, len(self.echo)) if body.logprobs is not None else None
        self.text = ""
        self.token_ids: list[int] | None = [] if body.return_token_ids else None
        self.new_token_ids: list[int] = []  # since the last streamed chunk
        self.finish_reason = self.stop_reason = None
        self.num_output_tokens = 0

    def add(self, delta: dict) -> str:
        """Take one delta; return the text it adds (the echoed prompt comes with the first)."""
        text, self.echo = self.echo + delta["text"], ""
        if self.logprobs is not None:
            if delta["prompt_logprobs"] is not None:
                self.logprobs.add(self.prompt_ids, delta["prompt_logprobs"])
            if delta["logprobs"] is not None:
                self.logprobs.add(delta["token_ids"], delta["logprobs"])
        self.text += text
        if self.token_ids is not None:
            self.token_ids += delta["token_ids"]
            self.new_token_ids += delta["token_ids"]
        self.finish_reason, self.stop_reason = delta["finish_reason"], delta["stop_reason"]
        self.num_output_tokens = delta["num_output_tokens"]
        return text

    def to_dict(self, text: str, logprobs: dict | None, token_ids: list[int] | None = None) -> dict:
        out = {"index": self.index, "text": text, "logprobs": logprobs, "finish_reason": self.finish_reason,
               "stop_reason": self.stop_reason}
        if token_ids is not None:
            out.update(token_ids=token_ids, prompt_token_ids=self.prompt_ids)
        return out

    def take_token_ids(self) -> list[int] | None:
        """The token ids since the last streamed chunk (None unless asked for)."""
        if self.token_ids is None:
            return None
        out, self.new_token_ids = self.new_token_ids, []
        return out


def _choices(prompts, body, tokenizer) -> list[_Choice]:
    return [_Choice(i, ids, text, body, tokenizer) for i, (ids, text) in enumerate(prompts)]


async def _collect(head, streams, prompts, body, tokenizer, num_prompt_tokens) -> dict:
    choices = _choices(prompts, body, tokenizer)
    async for index, delta in merge(streams):
        choices[index].add(delta)
    out = [c.to_dict(c.text, c.logprobs.to_dict() if c.logprobs else None, c.token_ids) for c in choices]
    return {**head, "choices": out, "usage": usage(num_prompt_tokens, sum(c.num_output_tokens for c in choices))}


async def _stream(head, streams, prompts, body, tokenizer, num_prompt_tokens, include_usage):
    choices = _choices(prompts, body, tokenizer)
    chunks = SseChunks(head)
    try:
        async for index, delta in merge(streams):
            choice = choices[index]
            text = choice.add(delta)
            logprobs = choice.logprobs.take() if choice.logprobs else None
            token_ids = choice.take_token_ids()
            if text or logprobs and logprobs["tokens"] or token_ids or choice.finish_reason:
                yield chunks.chunk(choices=[choice.to_dict(text, logprobs, token_ids)])
        if include_usage:
            yield chunks.chunk(choices=[], usage=usage(num_prompt_tokens, sum(c.num_output_tokens for c in choices)))
    except Exception as e:  # the status line is sent: report in the stream, then end it
        yield sse(from_exception(e).body())
    yield DONE
