"""The ingress deployment: the OpenAI-compatible HTTP app (glm_ray/serving/openai) over Serve
handles, plus `POST /v1/generate`, a token-level route for tools and tests; and the gRPC
`Generation` service (`Generate`, `Chat`), which Serve's gRPC proxy calls by method name."""

import asyncio
import json
import uuid

from fastapi import Request
from fastapi.responses import StreamingResponse
from ray import serve

from glm_ray.engine.sampling_params import SamplingParams
from glm_ray.serving.api_keys import ApiKeys
from glm_ray.serving.grpc_service import GenerationService, GrpcError
from glm_ray.serving.openai.app import create_app
from glm_ray.serving.openai.errors import error_response, from_exception
from glm_ray.serving.openai.metrics import Metrics
from glm_ray.serving.admission import Admission
from glm_ray.serving.timeout import TimedBackend
from glm_ray.serving.serve_backend import ServeBackend

_SAMPLING_FIELDS = set(SamplingParams.__dataclass_fields__)


def build_ingress_app(backend, **limits):
    """The OpenAI app over `backend`, plus /v1/generate."""
    app = create_app(backend, **limits)
    app.add_api_route("/v1/generate", generate, methods=["POST"])
    return app


async def generate(request: Request):
    """{"prompt" | "prompt_token_ids", SamplingParams fields..., "stream"?} -> token ids and text
    (or NDJSON deltas when streaming)."""
    backend = request.app.state.backend
    try:
        body = json.loads(await request.body())
    except json.JSONDecodeError as e:
        return error_response(400, f"request body is not valid JSON: {e}")
    if not isinstance(body, dict):
        return error_response(400, "request body must be a JSON object")
    if "prompt_token_ids" in body:
        ids = body["prompt_token_ids"]
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            return error_response(400, "prompt_token_ids must be a list of integers", param="prompt_token_ids")
    elif isinstance(body.get("prompt"), str):
        ids = await asyncio.to_thread(backend.tokenizer.encode, body["prompt"])  # off the event loop
    else:
        return error_response(400, "give 'prompt' (a string) or 'prompt_token_ids' (a list of integers)",
                              param="prompt")
    unknown = set(body) - _SAMPLING_FIELDS - {"prompt", "prompt_token_ids", "stream", "request_id"}
    if unknown:
        return error_response(400, f"unknown field(s): {', '.join(sorted(unknown))}", param=sorted(unknown)[0])
    sampling = {k: v for k, v in body.items() if k in _SAMPLING_FIELDS}
    try:
        SamplingParams(**sampling)
    except (ValueError, TypeError) as e:
        return error_response(400, str(e))
    req = {"prompt_token_ids": ids, "sampling_params": sampling, "prompt": body.get("prompt"),
           "request_id": body.get("request_id") or uuid.uuid4().hex, "stream": bool(body.get("stream"))}
    stream = backend.generate(req)
    if body.get("stream"):
        return StreamingResponse(_ndjson(stream), media_type="application/x-ndjson")
    return await _collect(stream)


async def _ndjson(stream):
    try:
        async for delta in stream:
            yield json.dumps(delta) + "\n"
    except Exception as e:
        err = from_exception(e)
        yield json.dumps(err.body()) + "\n"


async def _collect(stream):
    out = {"token_ids": [], "text": "", "logprobs": None, "prompt_logprobs": None}
    try:
        async for delta in stream:
            out["request_id"] = delta["request_id"]
            out["token_ids"] += delta["token_ids"]
            out["text"] += delta["text"]
            if delta["logprobs"] is not None:
                out["logprobs"] = (out["logprobs"] or []) + delta["logprobs"]
            if delta["prompt_logprobs"] is not None:
                out["prompt_logprobs"] = delta["prompt_logprobs"]
            out.update(finish_reason=delta["finish_reason"], stop_reason=delta["stop_reason"],
                       usage={"prompt_tokens": delta["num_prompt_tokens"],
                              "completion_tokens": delta["num_output_tokens"]})
    except Exception as e:
        return from_exception(e).response()
    return out


@serve.deployment(name="Ingress", max_ongoing_requests=1000)
@serve.ingress()
class Ingress:
    """Each replica builds its own app around its own backend (Serve's late-bound ingress); HTTP
    and gRPC share the backend, the metrics and the requests-in-flight limit."""

    def __init__(self, attention, router, expert_groups: list, model_dir: str, model_name: str,
                 engine_options: dict, max_body_bytes: int = 32 << 20, max_pending_requests: int = 256,
                 api_keys: list[str] | None = None, dispatch_auth: dict | None = None, refresh_s: float = 1.0,
                 max_prompts_per_request: int | None = None, request_timeout_s: float | None = None,
                 expert_wait_s: float = 300.0):
        self.expert_groups = expert_groups  # part of the app graph, so Serve deploys them
        self.backend = ServeBackend(attention, router, model_dir, model_name, engine_options, dispatch_auth,
                                    refresh_s, expert_wait_s)
        if request_timeout_s:
            self.backend = TimedBackend(self.backend, request_timeout_s)
        self.metrics, self.admission = Metrics(), Admission(max_pending_requests, max_prompts_per_request)
        self.max_body_bytes = max_body_bytes
        self.api_keys = ApiKeys(api_keys or [])
        self.grpc = GenerationService(self.backend, self.metrics, self.admission, self.api_keys)

    def __serve_build_asgi_app__(self):
        return build_ingress_app(self.backend, max_body_bytes=self.max_body_bytes, metrics=self.metrics,
                                 admission=self.admission, api_keys=self.api_keys)

    async def Generate(self, request, grpc_context=None):  # noqa: N802 - the rpc's name
        async for message in _with_status(self.grpc.generate(request, _authorization(grpc_context)), grpc_context):
            yield message

    async def Chat(self, request, grpc_context=None):  # noqa: N802 - the rpc's name
        async for message in _with_status(self.grpc.chat(request, _authorization(grpc_context)), grpc_context):
            yield message


def _authorization(grpc_context) -> str | None:
    """The call's `authorization` metadata (Serve's proxy hands the client's metadata over)."""
    if grpc_context is None:
        return None
    return next((v for k, v in grpc_context.invocation_metadata() if k.lower() == "authorization"), None)


async def _with_status(messages, grpc_context):
    """Hand a GrpcError's code and details to Serve's proxy (set on the context, then raise)."""
    try:
        async for message in messages:
            yield message
    except GrpcError as e:
        if grpc_context is not None:
            grpc_context.set_code(e.code)
            grpc_context.set_details(e.details)
        raise
