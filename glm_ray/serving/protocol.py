"""Plain-dict forms of engine outputs for crossing deployment boundaries (no torch objects)."""

from __future__ import annotations

from glm_ray.engine.outputs import RequestDelta


def logprobs_to_dict(entry) -> dict | None:
    if entry is None:
        return None
    return {str(tid): {"logprob": lp.logprob, "rank": lp.rank, "decoded_token": lp.decoded_token}
            for tid, lp in entry.items()}


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
    }
