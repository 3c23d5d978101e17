"""The offline Python API, with vLLM's conventions: `LLM(model=DIR).generate(prompts, params)`."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path

from glm_ray.engine.config import EngineOptions
from glm_ray.engine.llm_engine import LLMEngine
from glm_ray.engine.outputs import RequestOutput
from glm_ray.engine.sampling_params import SamplingParams


class LLM:
    """An in-process engine over a checkpoint directory. Engine options are keyword arguments
    (`dtype`, `max_num_seqs`, `max_num_batched_tokens`, `max_model_len`, `kv_cache_memory`,
    `num_kv_blocks`, `enable_prefix_caching`, ...); an unknown one is an error."""

    def __init__(self, model: str | Path | None = None, **engine_options):
        if model is None:
            from glm_ray.model.default import default_model_dir

            model = default_model_dir()
        self.engine = LLMEngine(model, EngineOptions.from_kwargs(**engine_options))
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def generate(
        self,
        prompts: str | dict | Sequence[str | dict],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """One output per prompt, in order. A prompt is a string or {"prompt_token_ids": [...]}."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        params = sampling_params or SamplingParams()
        params = list(params) if isinstance(params, Sequence) else [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(params)} sampling params")
        encoded = [self._encode(p) for p in prompts]
        for (ids, text), p in zip(encoded, params):
            self.engine.validate(ids, p)  # all or nothing: reject before any request starts
        requests = [self.engine.add_request(f"offline-{next(self._ids)}", ids, p, prompt=text)
                    for (ids, text), p in zip(encoded, params)]
        from tqdm import tqdm

        with tqdm(total=len(requests), desc="generating", disable=not use_tqdm) as bar:
            while self.engine.has_unfinished():
                bar.update(sum(d.finished for d in self.engine.step()))
        return [r.output() for r in requests]

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        tools: list[dict] | None = None,
        chat_template_kwargs: dict | None = None,
    ) -> list[RequestOutput]:
        """Render each conversation with the model's chat template, then generate."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [{"prompt_token_ids": self.tokenizer.encode_chat(c, tools=tools, **(chat_template_kwargs or {}))}
                   for c in conversations]
        return self.generate(prompts, sampling_params)

    def _encode(self, prompt: str | dict) -> tuple[list[int], str | None]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt), prompt
        if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            ids = prompt["prompt_token_ids"]
            if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
                raise ValueError("prompt_token_ids must be a list of integers")
            return list(ids), prompt.get("prompt")
        raise ValueError(f"a prompt is a string or {{'prompt_token_ids': [...]}}, got {type(prompt).__name__}")
