"""Driving backend streams: open them (errors surface before any response is sent), time them for
/metrics, and merge several (a multi-prompt completion) into one stream of (index, delta)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

from glm_ray.serving.openai.errors import OpenAIError, from_exception
from glm_ray.serving.openai.metrics import Metrics

DONE = "data: [DONE]\n\n"


# Characters JSON leaves raw that `str.splitlines` (and so httpx's `aiter_lines` and many hand-written
# SSE readers) takes for line ends: inside a `data:` line they would cut the JSON in two. json.dumps
# already escapes the C0 ones (\n, \r, \x0b, \x0c, \x1c-\x1e); these three it does not.
_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def line_json(obj) -> str:
    """`obj` as JSON on one line whatever the reader takes for a line end (non-ASCII text stays
    readable otherwise)."""
    return json.dumps(obj, ensure_ascii=False).translate(_LINE_BREAKS)


def sse(obj: dict) -> str:
    return f"data: {line_json(obj)}\n\n"


class SseChunks:
    """The SSE data lines of one streamed response, whose fixed fields (id, object, created,
    model) are serialised once, not again with every token: `chunk(**fields)` is
    `sse({**head, **fields})`, the fields being new keys."""

    def __init__(self, head: dict):
        self._prefix = "data: " + line_json(head)[:-1] + (", " if head else "")

    def chunk(self, **fields) -> str:
        return f"{self._prefix}{line_json(fields)[1:]}\n\n"


async def open_stream(backend, request: dict, metrics: Metrics, arrival: float) -> AsyncIterator[dict]:
    """Start one request and wait for its first delta, so a rejected request raises OpenAIError
    here (400/503) instead of failing halfway through a 200 response."""
    source = backend.generate(request)
    try:
        first = await anext(source)
    except StopAsyncIteration:
        raise OpenAIError(503, "the model backend ended the request without output", kind="service_unavailable")
    except Exception as e:
        await _close(source)
        raise from_exception(e) from None
    metrics.prompt_tokens.inc(len(request["prompt_token_ids"]))
    return _timed(source, first, metrics, arrival)


async def _timed(source, first: dict, metrics: Metrics, arrival: float) -> AsyncIterator[dict]:
    last = None
    delta = first
    try:
        while True:
            server = delta.get("metrics")
            if last is None and server and len(server["token_times"]) == len(delta["token_ids"]) > 1:
                # a whole (non-streamed) request: its token times are the engine's, not arrivals here
                metrics.observe_token_times(server["arrival_time"], server["token_times"])
                metrics.generation_tokens.inc(len(delta["token_ids"]))
            elif delta["token_ids"]:
                now = time.monotonic()
                metrics.observe_tokens(arrival, last, now, len(delta["token_ids"]))
                metrics.generation_tokens.inc(len(delta["token_ids"]))
                last = now
            yield delta
            if delta["finish_reason"] is not None:
                return
            try:
                delta = await anext(source)
            except StopAsyncIteration:
                raise OpenAIError(503, "the model backend ended the request before it finished",
                                  kind="service_unavailable") from None
            except Exception as e:
                raise from_exception(e) from None
    finally:
        await _close(source)


async def _close(source) -> None:
    close = getattr(source, "aclose", None)
    if close is not None:
        await close()


async def open_streams(backend, requests: list[dict], metrics: Metrics, arrival: float) -> list[AsyncIterator]:
    """Open all requests at once; if one is rejected the others are closed (aborted)."""
    results = await asyncio.gather(*(open_stream(backend, r, metrics, arrival) for r in requests),
                                   return_exceptions=True)
    failed = [r for r in results if isinstance(r, BaseException)]
    if failed:
        for stream in results:
            if not isinstance(stream, BaseException):
                await stream.aclose()
        raise failed[0] if isinstance(failed[0], OpenAIError) else from_exception(failed[0])
    return results


async def merge(streams: list[AsyncIterator[dict]]) -> AsyncIterator[tuple[int, dict]]:
    """(index, delta) from all streams as they arrive; an error in one ends the merge with it."""
    if len(streams) == 1:  # the common case needs no tasks
        async for delta in streams[0]:
            yield 0, delta
        return
    queue: asyncio.Queue = asyncio.Queue()
    finished = object()

    async def pump(index: int, stream) -> None:
        try:
            async for delta in stream:
                await queue.put((index, delta))
            await queue.put((index, finished))
        except Exception as e:  # handed to the consumer
            await queue.put((index, e))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            index, item = await queue.get()
            if item is finished:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
