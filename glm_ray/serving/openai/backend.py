"""What the OpenAI front end needs from whatever runs the model.

The app only speaks plain dicts to a `Backend`, so the same app serves an in-process engine
(`LocalBackend`, for tests and single-process use) or Ray Serve deployments (a backend whose
`generate` calls an attention replica's streaming handle).

A request is `{"request_id", "prompt_token_ids", "sampling_params": {SamplingParams fields}, "prompt",
"stream"}`; `generate` yields `glm_ray.serving.protocol.delta_to_dict` dicts, the last with a
finish_reason (with "stream": False only that one, holding the whole output), and
raises ValueError for a request the engine rejects (the app answers 400) and any other exception
when it cannot serve (the app answers 503).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol, runtime_checkable

from glm_ray.engine.sampling_params import SamplingParams
from glm_ray.serving.protocol import delta_to_dict


@runtime_checkable
class Backend(Protocol):
    model_name: str  # the `model` clients must send, and what /v1/models lists
    tokenizer: Any  # glm_ray.tokenizer.Tokenizer: encode, decode, apply_chat_template
    max_model_len: int  # prompt + output positions
    max_output_tokens: int  # ceiling on max_tokens

    def generate(self, request: dict) -> AsyncIterator[dict]:
        """Stream delta dicts for one request; leaving the iterator early aborts it."""
        ...

    async def health(self) -> tuple[bool, dict]:
        """(ok, details): ok is False when requests cannot be served now."""
        ...

    async def experts(self) -> dict:
        """Expert placement, replicas and routing counts, as /v1/experts shows them."""
        ...

    async def stats(self) -> dict:
        """{"running": int, "waiting": int, "kv_cache_usage": 0..1,
        "replicas": {group: int}, "routed_tokens": {group: int}} for /metrics."""
        ...


class LocalBackend:
    """A `Backend` over an in-process `AsyncLLMEngine`; experts run inside the engine."""

    def __init__(self, engine, model_name: str):
        self.engine = engine
        self.model_name = model_name
        self.tokenizer = engine.tokenizer
        self.max_model_len = engine.engine.limits.max_model_len
        self.max_output_tokens = engine.engine.limits.max_output_tokens
        self.dtype = str(engine.engine.dtype).removeprefix("torch.")

    async def generate(self, request: dict) -> AsyncIterator[dict]:
        params = SamplingParams(**request["sampling_params"])  # ValueError names the bad field
        async for delta in self.engine.generate(request["request_id"], request["prompt_token_ids"], params,
                                                request.get("prompt"), whole=request.get("stream") is False):
            yield delta_to_dict(delta)

    async def health(self) -> tuple[bool, dict]:
        alive = self.engine._thread.is_alive() and not self.engine._stopped
        return alive, {"status": "ok" if alive else "unavailable", "problems": [] if alive else ["the engine stopped"],
                       "model": self.model_name}

    async def experts(self) -> dict:
        return {"mode": "local", "replicas": {}, "tokens_per_expert": {}, "missing_groups": []}

    async def stats(self) -> dict:
        scheduler = self.engine.engine.scheduler.stats()
        limits = self.engine.engine.limits
        return {"running": scheduler.num_running, "waiting": scheduler.num_waiting,
                "kv_cache_usage": scheduler.num_used_blocks / max(1, limits.num_kv_blocks),
                "replicas": {}, "routed_tokens": {}}
