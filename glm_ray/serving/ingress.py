"""A minimal HTTP ingress: tokenizes, validates, streams from attention replicas.

`POST /v1/generate` and `GET /health`. The OpenAI-compatible front end builds on this.
"""


import json
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve

from glm_ray.engine.sampling_params import SamplingParams
from glm_ray.tokenizer import Tokenizer

app = FastAPI(title="glm-ray")

_SAMPLING_FIELDS = set(SamplingParams.__dataclass_fields__)


def _error(status: int, message: str, kind: str = "invalid_request_error", param=None):
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": status}},
                        status_code=status)


@serve.deployment(name="Ingress", max_ongoing_requests=1000)
@serve.ingress(app)
class Ingress:
    def __init__(self, attention, router, expert_groups: list, model_dir: str):
        self.attention = attention.options(stream=True)
        self.router = router
        self.expert_groups = expert_groups  # part of the app graph, so Serve deploys them
        self.tokenizer = Tokenizer.from_pretrained(model_dir)

    @app.get("/health")
    async def health(self):
        status = await self.router.status.remote()
        if status["missing_groups"]:
            return _error(503, f"expert groups without a live replica: {status['missing_groups']}",
                          "service_unavailable")
        return {"status": "ok", "replicas": status["replicas"]}

    @app.get("/v1/experts")
    async def experts(self):
        return await self.router.status.remote()

    @app.post("/v1/generate")
    async def generate(self, request: Request):
        try:
            body = await request.json()
        except json.JSONDecodeError as e:
            return _error(400, f"request body is not valid JSON: {e}")
        if not isinstance(body, dict):
            return _error(400, "request body must be a JSON object")
        if "prompt_token_ids" in body:
            ids = body["prompt_token_ids"]
            if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
                return _error(400, "prompt_token_ids must be a list of integers", param="prompt_token_ids")
        elif isinstance(body.get("prompt"), str):
            ids = self.tokenizer.encode(body["prompt"])
        else:
            return _error(400, "give 'prompt' (a string) or 'prompt_token_ids' (a list of integers)", param="prompt")
        unknown = set(body) - _SAMPLING_FIELDS - {"prompt", "prompt_token_ids", "stream", "request_id"}
        if unknown:
            return _error(400, f"unknown field(s): {', '.join(sorted(unknown))}", param=sorted(unknown)[0])
        sampling = {k: v for k, v in body.items() if k in _SAMPLING_FIELDS}
        try:
            SamplingParams(**sampling)
        except (ValueError, TypeError) as e:
            return _error(400, str(e))
        req = {"prompt_token_ids": ids, "sampling_params": sampling, "prompt": body.get("prompt"),
               "request_id": body.get("request_id") or uuid.uuid4().hex}
        stream = self.attention.generate.remote(req)
        if body.get("stream"):
            return StreamingResponse(self._ndjson(stream), media_type="application/x-ndjson")
        return await self._collect(stream)

    async def _ndjson(self, stream):
        try:
            async for delta in stream:
                yield json.dumps(delta) + "\n"
        except Exception as e:
            yield json.dumps({"error": {"message": _message(e), "type": _kind(e)}}) + "\n"

    async def _collect(self, stream):
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
            status = 400 if isinstance(e, ValueError) else 503
            return _error(status, _message(e), _kind(e))
        return out


def _kind(e: Exception) -> str:
    return "invalid_request_error" if isinstance(e, ValueError) else "service_unavailable"


def _message(e: Exception) -> str:
    # Ray wraps remote exceptions; the user needs the original message, not a traceback
    cause = getattr(e, "cause", None) or e
    return str(cause).strip().splitlines()[-1] if str(cause).strip() else type(cause).__name__
