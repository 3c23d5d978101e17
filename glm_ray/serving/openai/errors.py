"""OpenAI-shaped errors: `{"error": {"message", "type", "param", "code"}}`, raised at the edge."""

from __future__ import annotations

import re

from fastapi.responses import JSONResponse
from pydantic import ValidationError

_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "not_found_error", 405: "invalid_request_error",
          413: "request_too_large", 429: "rate_limit_exceeded", 500: "internal_error", 503: "service_unavailable"}
_FIELD = re.compile(r"[a-z_][a-z0-9_]*")
_TYPE_NAMES = frozenset({"str", "int", "float", "bool", "list", "dict", "none"})


class OpenAIError(Exception):
    """A request that cannot be served, with the HTTP status and the field to blame."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.kind = kind or _TYPES.get(status, "invalid_request_error")
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.status}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def error_response(status: int, message: str, param: str | None = None, kind: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return OpenAIError(status, message, param, kind, headers).response()


def from_exception(e: BaseException) -> OpenAIError:
    """ValueError is the engine/template rejecting the request (400); anything else means the
    backend could not serve it (503). Ray wraps remote errors: show the original's last line."""
    if isinstance(e, OpenAIError):
        return e
    cause = getattr(e, "cause", None) or e
    text = str(cause).strip()
    message = text.splitlines()[-1] if text else type(cause).__name__
    if isinstance(e, ValueError) or isinstance(cause, ValueError):
        return OpenAIError(400, message, param=guess_param(message))
    # retryable: a replica stopped (scale-down past its drain limit, a crash) or a group is missing
    return OpenAIError(503, f"the model backend failed: {message}; retry the request", kind="service_unavailable",
                       headers={"Retry-After": "1"})


def guess_param(message: str) -> str | None:
    """SamplingParams messages start with the field name ("top_k must be ...")."""
    first = message.split(" ", 1)[0]
    return first if _FIELD.fullmatch(first) and " must " in message else None


def param_path(loc: tuple) -> str | None:
    """("messages", 0, "TextPart", "text") -> "messages[0].text": drop pydantic's union tags."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif isinstance(part, str) and _FIELD.fullmatch(part) and part not in _TYPE_NAMES:
            path += ("." if path else "") + part
    return path or None


def from_validation_error(e: ValidationError) -> OpenAIError:
    errors = e.errors(include_url=False)
    first = errors[0]
    if first["type"] == "json_invalid":
        return OpenAIError(400, f"the request body is not valid JSON: {first['msg']}")
    param = param_path(first["loc"])
    if param is None:
        return OpenAIError(400, f"the request body must be a JSON object: {first['msg']}")
    tag = next((i for i, p in enumerate(first["loc"]) if isinstance(p, str) and param_path((p,)) is None), None)
    if tag is not None:  # a union: report every alternative that failed for this field
        param = param_path(first["loc"][:tag]) or param
        same = [err for err in errors if err["loc"][:tag] == first["loc"][:tag]]
        given = type(first.get("input")).__name__
        return OpenAIError(400, f"{param} has the wrong type or value ({given} given): "
                                + "; ".join(sorted({err["msg"] for err in same})), param=param)
    return OpenAIError(400, f"{param}: {first['msg']}", param=param)
