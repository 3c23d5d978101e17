"""The OpenAI-compatible HTTP front end, as a FastAPI app over a `Backend` (no Ray in here).

    app = create_app(LocalBackend(AsyncLLMEngine(model_dir), "glm-4.6"))

Routes read the backend from `request.app.state.backend`, so a Ray Serve ingress can wrap this app
(`serve.ingress(create_app(backend))`) or swap the backend after construction.
"""

from __future__ import annotations

import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from glm_ray.serving.api_keys import ApiKeys
from glm_ray.serving.openai.backend import Backend
from glm_ray.serving.openai.chat import create_chat_completion
from glm_ray.serving.openai.completions import create_completion
from glm_ray.serving.openai.errors import OpenAIError, error_response, from_exception, from_validation_error
from glm_ray.serving.openai.metrics import Metrics
from glm_ray.serving.admission import Admission
from glm_ray.serving.openai.middleware import ADMITTED, RequestGuard
from glm_ray.serving.openai.schemas import ChatCompletionRequest, CompletionRequest

DEFAULT_MAX_BODY_BYTES = 32 << 20


def _body_schema(model: type[BaseModel]) -> dict:
    """OpenAPI docs for a body the route parses itself (to answer errors in OpenAI's shape)."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": {
        "title": model.__name__, "type": "object", "description": model.__doc__ or ""}}}}}


async def parse_body(request: Request, model: type[BaseModel]) -> BaseModel:
    raw = await request.body()
    try:
        return model.model_validate_json(raw)
    except ValidationError as e:
        raise from_validation_error(e) from None


def count_prompts(prompt) -> int:
    """How many prompts a completion's `prompt` holds: a string or a token list is one."""
    if isinstance(prompt, list) and prompt and not all(isinstance(p, int) for p in prompt):
        return len(prompt)
    return 1


def admit_prompts(request: Request, prompts: int) -> None:
    """The middleware admitted the request as one generation; a multi-prompt one takes a place per
    prompt, within the cap on prompts (400) and the in-flight limit (429)."""
    admission: Admission = request.app.state.admission
    error = admission.too_many_prompts(prompts) or admission.busy_error(prompts, held=request.scope.get(ADMITTED, 0))
    if error is not None:
        raise error
    admission.in_flight += prompts - 1
    request.scope[ADMITTED] = request.scope.get(ADMITTED, 0) + prompts - 1  # released with the response


def create_app(backend: Backend, *, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
               max_pending_requests: int = 256, max_prompts_per_request: int | None = None,
               metrics: Metrics | None = None,
               admission: Admission | None = None, api_keys: ApiKeys | None = None) -> FastAPI:
    """`metrics` and `admission` may be shared with a gRPC front end in the same process; with
    `api_keys` set, every route but /health needs one (401)."""
    app = FastAPI(title="glm-ray OpenAI-compatible API", version="1")
    app.state.backend = backend
    app.state.metrics = metrics = metrics or Metrics()
    admission = admission or Admission(max_pending_requests, max_prompts_per_request)
    app.state.admission = admission
    app.state.created = int(time.time())
    app.add_middleware(RequestGuard, max_body_bytes=max_body_bytes, admission=admission, metrics=metrics,
                       api_keys=api_keys)

    @app.exception_handler(OpenAIError)
    async def openai_error(request: Request, e: OpenAIError):
        return e.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        message = f"{request.method} {request.url.path}: {e.detail}"
        return error_response(e.status_code, message, headers=getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError):
        return error_response(400, str(e.errors()[0].get("msg", "invalid request")))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, e: Exception):  # no stack traces to clients
        return error_response(500, f"internal error ({type(e).__name__}); the request was not completed")

    @app.get("/v1/models")
    async def list_models(request: Request):
        b = request.app.state.backend
        return {"object": "list", "data": [{"id": b.model_name, "object": "model", "created": app.state.created,
                                            "owned_by": "glm-ray", "max_model_len": b.max_model_len,
                                            "vocab_size": b.tokenizer.vocab_size,
                                            "dtype": getattr(b, "dtype", None)}]}

    @app.post("/v1/completions", openapi_extra=_body_schema(CompletionRequest))
    async def completions(request: Request):
        body = await parse_body(request, CompletionRequest)
        admit_prompts(request, count_prompts(body.prompt))
        return await create_completion(body, request.app.state.backend, request.app.state.metrics)

    @app.post("/v1/chat/completions", openapi_extra=_body_schema(ChatCompletionRequest))
    async def chat_completions(request: Request):
        body = await parse_body(request, ChatCompletionRequest)
        return await create_chat_completion(body, request.app.state.backend, request.app.state.metrics)

    @app.get("/health")
    async def health(request: Request):
        try:
            ok, details = await request.app.state.backend.health()
        except Exception as e:
            return from_exception(e if not isinstance(e, ValueError) else RuntimeError(str(e))).response()
        if not ok:
            return error_response(503, f"the model backend is {details.get('status', 'not healthy')}: "
                                  f"{'; '.join(details.get('problems') or []) or details}", kind="service_unavailable")
        return JSONResponse({"status": "ok", **details})

    @app.get("/metrics")
    async def prometheus(request: Request):
        try:
            stats = await request.app.state.backend.stats()
        except Exception:  # metrics must still come out when the backend is down
            stats = None
        return Response(request.app.state.metrics.render(stats), media_type=Metrics.content_type)

    @app.get("/v1/experts")
    async def experts(request: Request):
        try:
            return JSONResponse(await request.app.state.backend.experts())
        except Exception as e:
            return from_exception(RuntimeError(str(e))).response()

    @app.post("/v1/experts/rebalance")
    async def rebalance(request: Request):
        """Start a rebalance of the expert placement: balancedness before, predicted after (409
        while one is loading or before any token was routed)."""
        start = getattr(request.app.state.backend, "rebalance", None)
        if start is None:
            return error_response(400, "this server computes every routed expert in-process: there are no expert "
                                  "groups to rebalance", kind="invalid_request_error")
        try:
            return JSONResponse(await start())
        except Exception as e:  # noqa: BLE001 - a refusal is 409, the router unreachable 503
            cause = getattr(e, "cause", None) or e
            if isinstance(cause, ValueError):
                text = str(cause).strip()
                return error_response(409, text.splitlines()[-1] if text else "rebalance refused", kind="conflict")
            return from_exception(RuntimeError(str(e))).response()

    return app
