"""The plain reference forward: contiguous KV cache, no paging, greedy decoding.

Everything faster (the paged engine, the distributed app) is held equal to this in tests.
"""

from __future__ import annotations

import torch

from glm_ray.experts.backend import ExpertBackend
from glm_ray.model.dense_attention import DenseKVCache
from glm_ray.model.glm4_moe import Glm4MoeModel


@torch.inference_mode()
def prompt_logits(model: Glm4MoeModel, experts: ExpertBackend, prompts: list[list[int]]) -> list[torch.Tensor]:
    """All prompts in one flat step -> per prompt fp32 logits [len, V]."""
    cache = DenseKVCache()
    lens = [len(p) for p in prompts]
    cache.begin_step(list(range(len(prompts))), lens)
    device = model.embed_tokens.weight.device
    ids = torch.tensor([t for p in prompts for t in p], dtype=torch.long, device=device)
    positions = torch.cat([torch.arange(n) for n in lens]).to(device)
    return list(model.compute_logits(model(ids, positions, cache, experts)).split(lens))


@torch.inference_mode()
def greedy_generate(
    model: Glm4MoeModel,
    experts: ExpertBackend,
    prompts: list[list[int]],
    max_new_tokens: int,
    eos_token_ids: tuple[int, ...] | list[int] = (),
) -> list[list[int]]:
    """Greedy continuation of every prompt, decoded together; a sequence stops at an EOS id
    (included in its output) or after max_new_tokens."""
    cache = DenseKVCache()
    outputs: list[list[int]] = [[] for _ in prompts]
    live = list(range(len(prompts)))
    step_ids = [list(p) for p in prompts]
    lengths = [0] * len(prompts)
    eos = set(eos_token_ids)
    device = model.embed_tokens.weight.device
    while live and max_new_tokens > 0:
        cache.begin_step(live, [len(step_ids[i]) for i in live])
        ids = torch.tensor([t for i in live for t in step_ids[i]], dtype=torch.long, device=device)
        positions = torch.cat([torch.arange(lengths[i], lengths[i] + len(step_ids[i])) for i in live]).to(device)
        hidden = model(ids, positions, cache, experts)
        last = (torch.tensor([len(step_ids[i]) for i in live]).cumsum(0) - 1).to(device)
        next_ids = model.compute_logits(hidden[last]).argmax(dim=-1).tolist()
        still = []
        for i, tok in zip(live, next_ids):
            lengths[i] += len(step_ids[i])
            outputs[i].append(tok)
            step_ids[i] = [tok]
            if tok in eos or len(outputs[i]) >= max_new_tokens:
                cache.free(i)
            else:
                still.append(i)
        live = still
    return outputs
