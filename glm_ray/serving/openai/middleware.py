"""An ASGI middleware that guards the app before any route runs: API keys (401), body size (413),
generations in flight (429, counted with `Admission`, serving/admission.py, together with gRPC
streams; a multi-prompt completion adds its other prompts in its route), and the per-endpoint
request counter of /metrics (it sees every final status)."""

from __future__ import annotations

import json

from glm_ray.serving.admission import Admission
from glm_ray.serving.api_keys import OPEN_PATHS, ApiKeys
from glm_ray.serving.openai.errors import OpenAIError
from glm_ray.serving.openai.metrics import Metrics

ENDPOINTS = frozenset({"/v1/models", "/v1/completions", "/v1/chat/completions", "/v1/generate", "/health",
                       "/metrics", "/v1/experts", "/v1/experts/rebalance"})
GENERATE_ENDPOINTS = frozenset({"/v1/completions", "/v1/chat/completions", "/v1/generate"})
ADMITTED = "glm_ray.admitted"  # scope key: generations this request holds in `Admission` (a route may add some)


class BodyTooLarge(Exception):
    pass


class RequestGuard:
    def __init__(self, app, *, max_body_bytes: int, admission: Admission, metrics: Metrics,
                 api_keys: ApiKeys | None = None):
        self.app = app
        self.api_keys = api_keys or ApiKeys()
        self.max_body_bytes = max_body_bytes
        self.admission = admission
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        endpoint = path if path in ENDPOINTS else "other"
        status = {"code": 500, "started": False}

        async def send_counted(message):
            if message["type"] == "http.response.start":
                status.update(code=message["status"], started=True)
            await send(message)

        try:
            await self._guarded(scope, receive, send_counted, path)
        finally:
            self.metrics.requests.labels(endpoint, str(status["code"])).inc()

    async def _guarded(self, scope, receive, send, path):
        if self.api_keys.enabled and path not in OPEN_PATHS:
            authorization = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            problem = self.api_keys.problem(authorization)
            if problem is not None:
                return await _send_error(send, OpenAIError(401, problem, headers={"WWW-Authenticate": "Bearer"}))
        too_large = OpenAIError(413, f"the request body exceeds the limit of {self.max_body_bytes} bytes; "
                                     "send a shorter prompt or conversation")
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            return await _send_error(send, too_large)  # before reading a byte of the body
        if path in GENERATE_ENDPOINTS:
            busy = self.admission.busy_error()
            if busy is not None:
                return await _send_error(send, busy)
        received = 0

        async def receive_counted():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise BodyTooLarge()
            return message

        started = False

        async def send_tracked(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        counted = int(path in GENERATE_ENDPOINTS)
        self.admission.in_flight += counted
        scope[ADMITTED] = counted
        try:
            await self.app(scope, receive_counted, send_tracked)
        except BodyTooLarge:
            if not started:
                await _send_error(send, too_large)
        finally:
            self.admission.in_flight -= scope[ADMITTED]


async def _send_error(send, error: OpenAIError) -> None:
    body = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in (error.headers or {}).items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
