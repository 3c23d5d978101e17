"""Plain-dict forms of engine outputs for crossing deployment boundaries (no torch objects)."""

from __future__ import annotations

from glm_ray.engine.outputs import RequestDelta, RequestMetrics


def logprobs_to_dict(entry) -> dict | None:
    if entry is None:
        return None
    return {str(tid): {"logprob": lp.logprob, "rank": lp.rank, "decoded_token": lp.decoded_token}
            for tid, lp in entry.items()}


def metrics_to_dict(m: RequestMetrics) -> dict:
    """A finished request's timing, in seconds of the serving host's `time.monotonic()`."""
    return {"arrival_time": m.arrival_time, "first_token_time": m.first_token_time,
            "finished_time": m.finished_time, "token_times": list(m.token_times),
            "num_cached_tokens": m.num_cached_tokens}


def delta_to_dict(d: RequestDelta) -> dict:
    return {
        "request_id": d.request_id,
        "token_ids": d.new_token_ids,
        "text": d.new_text,
        "logprobs": [logprobs_to_dict(e) for e in d.new_logprobs] if d.new_logprobs is not None else None,
        "finish_reason": d.finish_reason,
        "stop_reason": d.stop_reason,
        "num_prompt_tokens": d.num_prompt_tokens,
        "num_output_tokens": d.num_output_tokens,
        "prompt_logprobs": [logprobs_to_dict(e) for e in d.prompt_logprobs] if d.prompt_logprobs is not None
        else None,
        "metrics": metrics_to_dict(d.metrics) if d.metrics is not None else None,
    }


def merge_delta_dicts(earlier: dict, later: dict) -> dict:
    """Two consecutive delta dicts of one request as one (a reader that fell behind)."""
    logprobs = None
    if earlier["logprobs"] is not None or later["logprobs"] is not None:
        logprobs = (earlier["logprobs"] or []) + (later["logprobs"] or [])
    return {**later, "token_ids": earlier["token_ids"] + later["token_ids"], "text": earlier["text"] + later["text"],
            "logprobs": logprobs, "prompt_logprobs": earlier["prompt_logprobs"] or later["prompt_logprobs"],
            "metrics": later["metrics"] or earlier["metrics"]}
