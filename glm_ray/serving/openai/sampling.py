"""From a request body to the engine request dict, with every limit checked at this edge."""

from __future__ import annotations

import uuid

from glm_ray.engine.sampling_params import SamplingParams
from glm_ray.serving.openai.errors import OpenAIError, guess_param
from glm_ray.serving.openai.schemas import SamplingFields

_PASSED_THROUGH = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
                   "frequency_penalty", "seed", "stop", "stop_token_ids", "min_tokens")


def check_common(body: SamplingFields, backend) -> None:
    """Model name and the options this server does not implement."""
    if body.model != backend.model_name:
        raise OpenAIError(404, f"the model {body.model!r} does not exist; this server serves "
                               f"{backend.model_name!r}", param="model", kind="not_found_error")
    if body.n != 1:
        raise OpenAIError(400, f"n must be 1 (one choice per prompt), got {body.n}", param="n")
    if body.logit_bias:
        raise OpenAIError(400, "logit_bias is not supported", param="logit_bias")


def check_length(backend, num_prompt_tokens: int, max_tokens: int, param: str = "max_tokens") -> None:
    if max_tokens > backend.max_output_tokens:
        raise OpenAIError(400, f"{param} ({max_tokens}) exceeds this server's output limit of "
                               f"{backend.max_output_tokens} tokens", param=param)
    if num_prompt_tokens + max_tokens > backend.max_model_len:
        raise OpenAIError(400, f"this model's maximum context length is {backend.max_model_len} tokens, but the "
                               f"prompt has {num_prompt_tokens} tokens and {param} is {max_tokens} "
                               f"({num_prompt_tokens + max_tokens} in total); shorten the prompt or lower "
                               f"{param}", param=param)


def sampling_dict(body: SamplingFields, max_tokens: int, **extra) -> dict:
    """SamplingParams fields for the backend, validated here so a bad value is a 400 naming it."""
    params = {name: getattr(body, name) for name in _PASSED_THROUGH if getattr(body, name) is not None}
    params.update(max_tokens=max_tokens, ignore_eos=body.ignore_eos, skip_special_tokens=body.skip_special_tokens)
    params.update({k: v for k, v in extra.items() if v is not None})
    try:
        SamplingParams(**params)
    except (ValueError, TypeError) as e:
        raise OpenAIError(400, str(e), param=guess_param(str(e))) from None
    return params


def make_request(request_id: str, prompt_token_ids: list[int], params: dict, prompt: str | None,
                 stream: bool = True) -> dict:
    """stream=False: the backend returns the output in one piece (a client that waits for the
    whole response needs no per-token messages between deployments)."""
    return {"request_id": request_id, "prompt_token_ids": prompt_token_ids, "sampling_params": params,
            "prompt": prompt, "stream": stream}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(num_prompt_tokens: int, num_completion_tokens: int) -> dict:
    return {"prompt_tokens": num_prompt_tokens, "completion_tokens": num_completion_tokens,
            "total_tokens": num_prompt_tokens + num_completion_tokens}
