"""A per-request time limit around any `Backend`: a generation not finished `timeout_s` after it
started is aborted (its stream closed, so the attention replica stops and frees its KV cache) and
answered with 504 / DEADLINE_EXCEEDED, or an error event when its stream had begun."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from glm_ray.serving.openai.errors import OpenAIError


class RequestTimeout(OpenAIError):
    def __init__(self, timeout_s: float):
        super().__init__(504, f"the request did not finish within the server's request_timeout_s ({timeout_s:g} s) "
                              "and was stopped; ask for fewer tokens or retry", kind="timeout")


class TimedBackend:
    """`backend` with every `generate` stream limited to `timeout_s`; everything else passes through."""

    def __init__(self, backend, timeout_s: float):
        if timeout_s <= 0:
            raise ValueError(f"request_timeout_s must be > 0, got {timeout_s}")
        self._backend, self.timeout_s = backend, timeout_s

    def __getattr__(self, name):
        return getattr(self._backend, name)

    async def generate(self, request: dict) -> AsyncIterator[dict]:
        deadline = time.monotonic() + self.timeout_s
        source = self._backend.generate(request)
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RequestTimeout(self.timeout_s)
                try:
                    delta = await asyncio.wait_for(anext(source), left)
                except StopAsyncIteration:
                    return
                except asyncio.TimeoutError:
                    raise RequestTimeout(self.timeout_s) from None
                yield delta
        finally:
            close = getattr(source, "aclose", None)
            if close is not None:
                await close()
