"""Runs one scheduled step: flat inputs from the chunks, one forward, logits where needed, sampling.

Legend: T step tokens, S sampled rows, V vocab.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from glm_ray.engine.attention_workers import AttentionWorkers
from glm_ray.engine.kv_cache import PagedAttention, PagedKVCache, StepChunk
from glm_ray.engine.sampler import Logprob, Sampler
from glm_ray.engine.scheduler import ScheduledChunk
from glm_ray.experts.backend import ExpertBackend
from glm_ray.model.glm4_moe import Glm4MoeModel


@dataclass
class StepResult:
    sampled: dict[str, int]  # request id -> new token
    logprobs: dict[str, dict[int, Logprob] | None]
    prompt_logits: dict[str, torch.Tensor]  # request id -> fp32 logits of this chunk's prompt positions


class ModelRunner:
    """`microbatches` > 1 splits a step's sequences into that many groups of about equal tokens,
    run layer by layer in turn (`Glm4MoeModel.forward_interleaved`): with remote experts, one
    group's attention then overlaps another's expert round trip."""

    def __init__(self, model: Glm4MoeModel, experts: ExpertBackend, cache: PagedKVCache, sampler: Sampler,
                 microbatches: int = 1, workers: AttentionWorkers | None = None):
        self.model, self.experts, self.cache, self.sampler = model, experts, cache, sampler
        self.microbatches, self.workers = microbatches, workers

    @torch.inference_mode()
    def run(self, chunks: list[ScheduledChunk], requests: dict) -> StepResult:
        step_chunks, offset = [], 0
        for c in chunks:
            step_chunks.append(StepChunk(offset, c.num_tokens, c.end, c.seq.block_table))
            offset += c.num_tokens
        hidden = self._forward(chunks, step_chunks)  # [T, H]

        prompt_logits = {}
        for c, sc in zip(chunks, step_chunks):
            req = requests[c.seq.seq_id]
            n_prompt = min(c.end, c.seq.num_prompt_tokens) - c.start  # prompt positions in this chunk
            if req.wants_prompt_logprobs and n_prompt > 0:
                prompt_logits[req.request_id] = self.model.compute_logits(hidden[sc.offset:sc.offset + n_prompt])

        sampling = [(c, sc) for c, sc in zip(chunks, step_chunks) if c.sample]
        if not sampling:
            return StepResult({}, {}, prompt_logits)
        rows = torch.tensor([sc.offset + sc.num_tokens - 1 for _, sc in sampling], device=hidden.device)
        logits = self.model.compute_logits(hidden.index_select(0, rows))  # [S, V]
        reqs = [requests[c.seq.seq_id] for c, _ in sampling]
        out = self.sampler(logits, reqs)
        tokens = out.sampled_token_ids.tolist()
        return StepResult({r.request_id: t for r, t in zip(reqs, tokens)},
                          {r.request_id: lp for r, lp in zip(reqs, out.logprobs)}, prompt_logits)

    def _forward(self, chunks: list[ScheduledChunk], step_chunks: list[StepChunk]) -> torch.Tensor:
        self.experts.begin_step()  # every MoE layer of this step goes by one expert placement
        groups = _split_by_tokens(len(chunks), [c.num_tokens for c in chunks], self.microbatches)
        batches = []
        for start, end in groups:
            ids, positions, local, offset = [], [], [], 0
            for c, sc in zip(chunks[start:end], step_chunks[start:end]):
                ids.extend(c.token_ids)
                positions.extend(range(c.start, c.end))
                local.append(StepChunk(offset, sc.num_tokens, sc.context_len, sc.blocks))
                offset += sc.num_tokens
            device = self.cache.device  # step inputs go over once; only sampled ids come back
            batches.append((torch.tensor(ids, dtype=torch.long, device=device),
                            torch.tensor(positions, dtype=torch.long, device=device),
                            PagedAttention(self.cache, local, self.workers)))
        if len(batches) == 1:
            return self.model(*batches[0], self.experts)
        return torch.cat(self.model.forward_interleaved(batches, self.experts))


def _split_by_tokens(n: int, num_tokens: list[int], parts: int) -> list[tuple[int, int]]:
    """[start, end) runs of the n chunks, at most `parts` of them, each near total/parts tokens."""
    parts = max(1, min(parts, n))
    total, bounds, acc = sum(num_tokens), [0], 0
    for i, t in enumerate(num_tokens[:-1]):
        acc += t
        if len(bounds) < parts and acc >= total * len(bounds) / parts:
            bounds.append(i + 1)
    bounds.append(n)
    return list(zip(bounds, bounds[1:]))
