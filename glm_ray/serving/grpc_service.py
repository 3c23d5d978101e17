"""The gRPC `Generation` service (protos/glm_ray/v1/generate.proto) over the same `Backend` as the
OpenAI app: requests are turned into the OpenAI request models, so validation, limits, the chat
template and the reasoning/tool-call parsers are the HTTP API's own, and errors become status codes.

No Ray in here: the Serve ingress exposes `generate`/`chat` as its `Generate`/`Chat` methods (Serve's
gRPC proxy calls them by name), and tests can drive the service with a plain `grpc.aio` server.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

import grpc
from pydantic import BaseModel, ValidationError

from glm_ray.serving.api_keys import ApiKeys
from glm_ray.serving.openai.chat import chat_events, start_chat
from glm_ray.serving.openai.completions import prompts_of, token_text
from glm_ray.serving.openai.errors import OpenAIError, from_exception, from_validation_error
from glm_ray.serving.openai.metrics import Metrics
from glm_ray.serving.admission import Admission
from glm_ray.serving.openai.sampling import (check_common, check_length, make_request, new_id, sampling_dict,
                                             usage)
from glm_ray.serving.openai.schemas import DEFAULT_MAX_TOKENS, ChatCompletionRequest, CompletionRequest
from glm_ray.serving.openai.streams import merge, open_streams
from glm_ray.v1 import generate_pb2 as pb

STATUS_CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED, 404: grpc.StatusCode.NOT_FOUND,
                413: grpc.StatusCode.RESOURCE_EXHAUSTED, 429: grpc.StatusCode.RESOURCE_EXHAUSTED,
                503: grpc.StatusCode.UNAVAILABLE, 504: grpc.StatusCode.DEADLINE_EXCEEDED}

_OPTIONAL = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty",
             "seed", "min_tokens", "skip_special_tokens")


class GrpcError(Exception):
    """A request answered with a non-OK status; `details` names the field at fault."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(details)
        self.code, self.details = code, details

    def __reduce__(self):  # Serve pickles it from the replica to the gRPC proxy
        return GrpcError, (self.code, self.details)

    @classmethod
    def of(cls, e: BaseException) -> GrpcError:
        if isinstance(e, GrpcError):
            return e
        err = from_exception(e)
        return cls(STATUS_CODES.get(err.status, grpc.StatusCode.INTERNAL), err.message)


def sampling_fields(options: pb.SamplingOptions) -> dict:
    """The set fields of SamplingOptions, under the OpenAI request's names."""
    out = {name: getattr(options, name) for name in _OPTIONAL if options.HasField(name)}
    if options.stop:
        out["stop"] = list(options.stop)
    if options.stop_token_ids:
        out["stop_token_ids"] = list(options.stop_token_ids)
    if options.ignore_eos:
        out["ignore_eos"] = True
    return out


def _validated(model: type[BaseModel], body: dict) -> BaseModel:
    try:
        return model.model_validate(body)
    except ValidationError as e:
        raise from_validation_error(e) from None


def _logprobs(tokenizer, token_ids: list[int], entries: list[dict] | None) -> list[pb.TokenLogprob]:
    out = []
    for token_id, entry in zip(token_ids, entries or []):
        chosen = entry[str(token_id)]
        top = sorted(entry.items(), key=lambda kv: kv[1]["rank"])
        out.append(pb.TokenLogprob(
            token_id=token_id, token=token_text(tokenizer, token_id, chosen), logprob=chosen["logprob"],
            top_logprobs=[pb.TopLogprob(token_id=int(t), token=token_text(tokenizer, t, e), logprob=e["logprob"])
                          for t, e in top if int(t) != token_id]))
    return out


class GenerationService:
    """`Generate` and `Chat` as async generators of response messages; they raise GrpcError.
    `authorization` is the call's `authorization` metadata, checked when API keys are set."""

    def __init__(self, backend, metrics: Metrics | None = None, admission: Admission | None = None,
                 api_keys: ApiKeys | None = None):
        self.backend = backend
        self.metrics = metrics or Metrics()
        self.admission = admission or Admission(256)
        self.api_keys = api_keys or ApiKeys()

    async def generate(self, request: pb.GenerateRequest,
                       authorization: str | None = None) -> AsyncIterator[pb.GenerateResponse]:
        async for message in self._admitted("Generate", self._generate(request), authorization):
            yield message

    async def chat(self, request: pb.ChatRequest, authorization: str | None = None) -> AsyncIterator[pb.ChatResponse]:
        async for message in self._admitted("Chat", self._chat(request), authorization):
            yield message

    async def _admitted(self, method: str, messages: AsyncIterator, authorization: str | None) -> AsyncIterator:
        """API key, admission control and the request counter around one call."""
        status = grpc.StatusCode.OK
        try:
            problem = self.api_keys.problem(authorization)
            if problem is not None:
                raise GrpcError(grpc.StatusCode.UNAUTHENTICATED, problem)
            busy = self.admission.busy_error()
            if busy is not None:
                raise GrpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, busy.message)
            self.admission.in_flight += 1
            try:
                async for message in messages:
                    yield message
            finally:
                self.admission.in_flight -= 1
        except (GeneratorExit, asyncio.CancelledError):
            status = grpc.StatusCode.CANCELLED  # the client went away; the request was aborted
            raise
        except Exception as e:
            err = GrpcError.of(e)
            status = err.code
            raise err from None
        finally:
            self.metrics.requests.labels(f"grpc:{method}", status.name).inc()

    # --- Generate -------------------------------------------------------------------------------

    async def _generate(self, request: pb.GenerateRequest) -> AsyncIterator[pb.GenerateResponse]:
        arrival = time.monotonic()
        backend = self.backend
        which = request.WhichOneof("input")
        if which is None:
            raise OpenAIError(400, "give prompt (text) or prompt_token_ids", param="prompt")
        sampling = sampling_fields(request.sampling)
        body = {"model": request.model or backend.model_name, **sampling,
                "prompt": request.prompt if which == "prompt" else list(request.prompt_token_ids.ids)}
        options = request.sampling
        if options.HasField("max_tokens"):
            body["max_tokens"] = options.max_tokens
        if options.HasField("logprobs"):
            body["logprobs"] = options.logprobs
        body = _validated(CompletionRequest, body)
        check_common(body, backend)
        (ids, text), = await asyncio.to_thread(prompts_of, body, backend.tokenizer)  # off the event loop
        max_tokens = DEFAULT_MAX_TOKENS if body.max_tokens is None else body.max_tokens
        check_length(backend, len(ids), max_tokens)
        params = sampling_dict(body, max_tokens, logprobs=body.logprobs)
        request_id = request.request_id or new_id("gen")
        streams = await open_streams(backend, [make_request(request_id, ids, params, text)], self.metrics, arrival)
        async for _, d in merge(streams):
            message = pb.GenerateResponse(request_id=request_id, token_ids=d["token_ids"], text=d["text"],
                                          finish_reason=d["finish_reason"] or "")
            if body.logprobs is not None:
                message.logprobs.extend(_logprobs(backend.tokenizer, d["token_ids"], d["logprobs"]))
            if d["finish_reason"] is not None:
                message.usage.CopyFrom(pb.Usage(**usage(len(ids), d["num_output_tokens"])))
            yield message

    # --- Chat -----------------------------------------------------------------------------------

    async def _chat(self, request: pb.ChatRequest) -> AsyncIterator[pb.ChatResponse]:
        backend = self.backend
        body = _validated(ChatCompletionRequest, chat_body(request, backend.model_name))
        setup, chat_id, streams = await start_chat(body, backend, self.metrics)
        if request.request_id:
            chat_id = request.request_id
        async for e in chat_events(streams, setup):
            delta = e["delta"]
            message = pb.ChatResponse(id=chat_id, content=delta.get("content", ""),
                                      reasoning_content=delta.get("reasoning_content", ""),
                                      finish_reason=e["finish_reason"] or "")
            for call in delta.get("tool_calls", []):
                function = call["function"]
                message.tool_calls.add(index=call["index"], id=call.get("id", ""), name=function.get("name", ""),
                                       arguments=function.get("arguments", ""))
            if body.logprobs:
                message.logprobs.extend(_logprobs(backend.tokenizer, e["token_ids"], e["entries"]))
            if e["finish_reason"] is not None:
                message.usage.CopyFrom(pb.Usage(**usage(len(setup.prompt_ids), e["num_output_tokens"])))
            elif not (message.content or message.reasoning_content or message.tool_calls or message.logprobs):
                continue  # held back by a parser (a tag may be starting): nothing to send yet
            yield message


def chat_body(request: pb.ChatRequest, default_model: str) -> dict:
    """A ChatRequest as the OpenAI chat request body it means."""
    messages = []
    for i, m in enumerate(request.messages):
        message = {"role": m.role}
        if m.HasField("content"):
            message["content"] = m.content
        if m.HasField("reasoning_content"):
            message["reasoning_content"] = m.reasoning_content
        if m.tool_call_id:
            message["tool_call_id"] = m.tool_call_id
        if m.name:
            message["name"] = m.name
        if m.tool_calls:
            message["tool_calls"] = [{"id": c.id or None, "type": "function",
                                      "function": {"name": c.name, "arguments": c.arguments or "{}"}}
                                     for c in m.tool_calls]
        messages.append(message)
    tools = []
    for i, tool in enumerate(request.tools):
        function = {"name": tool.name, "description": tool.description}
        if tool.parameters:
            function["parameters"] = _json_object(tool.parameters, f"tools[{i}].parameters")
        tools.append({"type": "function", "function": function})
    body = {"model": request.model or default_model, "messages": messages, **sampling_fields(request.sampling)}
    options = request.sampling
    if options.HasField("max_tokens"):
        body["max_completion_tokens"] = options.max_tokens
    if options.HasField("logprobs"):
        body.update(logprobs=True, top_logprobs=options.logprobs)
    if tools:
        body["tools"] = tools
    choice = request.tool_choice
    if choice:
        body["tool_choice"] = choice if choice in ("none", "auto", "required") else \
            {"type": "function", "function": {"name": choice}}
    if request.HasField("parallel_tool_calls"):
        body["parallel_tool_calls"] = request.parallel_tool_calls
    kwargs = _json_object(request.chat_template_kwargs, "chat_template_kwargs") if request.chat_template_kwargs else {}
    if request.HasField("enable_thinking"):
        kwargs["enable_thinking"] = request.enable_thinking
    if kwargs:
        body["chat_template_kwargs"] = kwargs
    return body


def _json_object(text: str, field: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise OpenAIError(400, f"{field} is not valid JSON: {e}", param=field) from None
    if not isinstance(value, dict):
        raise OpenAIError(400, f"{field} must be a JSON object, got {type(value).__name__}", param=field)
    return value
