"""Batched sampling: logits of B requests in, one next token per request out.

Shapes: B rows (one per running request), V vocabulary, T prompt tokens, R rows that need
a given step (a subset of B).

Order of processing, as in vLLM: min_tokens masking, repetition penalty, presence and
frequency penalties, temperature, top-k, top-p, min-p, then the draw. Logprobs are taken
from the raw logits, before any of that (vLLM's default "raw_logprobs").

Each request may carry its own torch.Generator (from its seed); its noise is drawn from that
generator alone, reseeded for each position from (seed, position), so a seeded request gives the
same tokens whatever else shares the batch, and whichever engine draws a given position: a
request resumed on another replica after the first was lost goes on with the same draws.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from itertools import chain
from typing import Protocol, Sequence

import torch

from glm_ray.engine.sampling_params import SamplingParams


@dataclass
class Logprob:
    """Log-probability of one token; rank 1 is the most likely token."""

    logprob: float
    rank: int
    decoded_token: str | None = None  # filled in by the detokenizer


class SamplingRow(Protocol):
    """What the sampler reads from each running request (a Sequence object may serve)."""

    sampling_params: SamplingParams
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]
    generator: torch.Generator | None


@dataclass
class SamplingState:
    """A plain SamplingRow, for callers that have no request object at hand."""

    sampling_params: SamplingParams
    prompt_token_ids: list[int] = field(default_factory=list)
    output_token_ids: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None


@dataclass
class SamplerOutput:
    sampled_token_ids: torch.Tensor  # [B] int64, on the logits' device
    logprobs: list[dict[int, Logprob] | None]  # per row; None where not requested


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator | None:
    """The per-request generator for `seed`; None (use the sampler's) when unseeded.

    Draws are reproducible for a given seed on a given device type; CPU and CUDA differ.
    """
    if seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def position_seed(seed: int, position: int) -> int:
    """The generator seed for drawing output token `position` of a request seeded with `seed`:
    splitmix64 of the pair, so neighbouring seeds and positions give unrelated streams."""
    z = (seed * 0x9E3779B97F4A7C15 + (position + 1) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) & 0x7FFFFFFFFFFFFFFF  # manual_seed takes a signed 64-bit value


def _token_counts(token_ids: list[Sequence[int]], vocab_size: int,
                  device: torch.device) -> torch.Tensor:
    """[R, V] float32: how often each token occurs in each row's list."""
    counts = torch.zeros(len(token_ids), vocab_size, dtype=torch.float32, device=device)
    lengths = torch.tensor([len(ids) for ids in token_ids])
    if int(lengths.sum()) == 0:
        return counts
    rows = torch.repeat_interleave(torch.arange(len(token_ids)), lengths).to(device)
    ids = torch.tensor(list(chain.from_iterable(token_ids)), dtype=torch.long, device=device)
    counts.index_put_((rows, ids), torch.ones_like(ids, dtype=torch.float32), accumulate=True)
    return counts


def apply_min_tokens(logits: torch.Tensor, rows: Sequence[SamplingRow],
                     eos_token_ids: Sequence[int]) -> None:
    """In place: rows short of min_tokens may not pick a token that would end them."""
    row_idx, tok_idx = [], []
    for i, row in enumerate(rows):
        params = row.sampling_params
        if len(row.output_token_ids) >= params.min_tokens:
            continue
        banned = set(params.stop_token_ids)
        if not params.ignore_eos:  # with ignore_eos, EOS does not end the request anyway
            banned.update(eos_token_ids)
        row_idx += [i] * len(banned)
        tok_idx += sorted(banned)
    if row_idx:
        logits[torch.tensor(row_idx, device=logits.device),
               torch.tensor(tok_idx, device=logits.device)] = float("-inf")


def apply_penalties(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> None:
    """In place: repetition (HF, prompt + output), then presence and frequency (OpenAI, output)."""
    vocab_size, device = logits.shape[1], logits.device
    rep = [i for i, r in enumerate(rows) if r.sampling_params.repetition_penalty != 1.0]
    if rep:
        seen = _token_counts([list(rows[i].prompt_token_ids) + list(rows[i].output_token_ids)
                              for i in rep], vocab_size, device) > 0  # [R, V]
        penalty = torch.tensor([rows[i].sampling_params.repetition_penalty for i in rep],
                               dtype=torch.float32, device=device)[:, None]
        sub = logits[rep]
        # A penalty > 1 must lower a seen token's score whatever its sign: shrink positives
        # towards zero, push negatives further down.
        penalised = torch.where(sub > 0, sub / penalty, sub * penalty)
        logits[rep] = torch.where(seen, penalised, sub)
    pf = [i for i, r in enumerate(rows)
          if r.sampling_params.presence_penalty != 0.0
          or r.sampling_params.frequency_penalty != 0.0]
    if pf:
        counts = _token_counts([rows[i].output_token_ids for i in pf], vocab_size, device)
        freq = torch.tensor([rows[i].sampling_params.frequency_penalty for i in pf],
                            dtype=torch.float32, device=device)[:, None]
        pres = torch.tensor([rows[i].sampling_params.presence_penalty for i in pf],
                            dtype=torch.float32, device=device)[:, None]
        sub = logits[pf]
        sub -= freq * counts
        sub -= pres * (counts > 0).float()
        logits[pf] = sub


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor | None,
                      top_p: torch.Tensor | None) -> torch.Tensor:
    """Mask to -inf what top-k / top-p drop. top_k [B] long (V = off), top_p [B] (inf = off)."""
    sorted_logits, sorted_ids = logits.sort(dim=-1, descending=True)  # [B, V]
    if top_k is not None:
        position = torch.arange(logits.shape[1], device=logits.device)
        sorted_logits.masked_fill_(position[None, :] >= top_k[:, None], float("-inf"))
    if top_p is not None:
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # probability of the strictly better tokens
        # Keep a token while the better ones do not yet reach top_p; the first always stays.
        sorted_logits.masked_fill_(mass_before >= top_p[:, None], float("-inf"))
    return torch.empty_like(logits).scatter_(-1, sorted_ids, sorted_logits)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> None:
    """In place: drop tokens whose probability is below min_p [B] times the row's best."""
    probs = logits.softmax(dim=-1)
    threshold = min_p[:, None] * probs.amax(dim=-1, keepdim=True)
    logits.masked_fill_(probs < threshold, float("-inf"))


def process_logits(logits: torch.Tensor, rows: Sequence[SamplingRow],
                   eos_token_ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Returns (logits ready to draw from, greedy ids or None when no row is greedy).

    Greedy rows leave with their penalised logits unscaled and unfiltered.
    """
    logits = logits.to(torch.float32, copy=True)  # [B, V]
    device = logits.device
    params = [r.sampling_params for r in rows]
    apply_min_tokens(logits, rows, eos_token_ids)
    apply_penalties(logits, rows)
    greedy = [p.is_greedy for p in params]
    greedy_ids = logits.argmax(dim=-1) if any(greedy) else None
    if all(greedy):
        return logits, greedy_ids
    temperature = torch.tensor([1.0 if g else p.temperature for p, g in zip(params, greedy)],
                               dtype=torch.float32, device=device)
    logits.div_(temperature[:, None])
    # Greedy rows get neutral values (k = V, p = inf, min_p = 0) so the filters skip them.
    drawn = [None if g else p for p, g in zip(params, greedy)]
    if any(p and (p.top_k > 0 or p.top_p < 1.0) for p in drawn):
        vocab_size = logits.shape[1]
        top_k = torch.tensor([p.top_k if p and p.top_k > 0 else vocab_size for p in drawn],
                             device=device)
        top_p = torch.tensor([p.top_p if p and p.top_p < 1.0 else float("inf") for p in drawn],
                             dtype=torch.float32, device=device)
        logits = apply_top_k_top_p(logits, top_k, top_p)
    if any(p and p.min_p > 0.0 for p in drawn):
        min_p = torch.tensor([p.min_p if p else 0.0 for p in drawn],
                             dtype=torch.float32, device=device)
        apply_min_p(logits, min_p)
    return logits, greedy_ids


def _top_logprobs(logprobs: torch.Tensor, token_ids: torch.Tensor,
                  num_logprobs: Sequence[int]) -> list[dict[int, Logprob]]:
    """Per row: the chosen token (first) and the row's top num_logprobs, with ranks.

    logprobs [R, V], token_ids [R], num_logprobs R counts.
    """
    token_logprob = logprobs.gather(1, token_ids[:, None])  # [R, 1]
    # Rank = 1 + number of strictly more likely tokens.
    token_rank = (logprobs > token_logprob).sum(dim=-1) + 1  # [R]
    max_n = min(max(num_logprobs, default=0), logprobs.shape[1])
    top_values, top_ids = logprobs.topk(max_n, dim=-1) if max_n else (None, None)
    token_ids_l, token_lp_l = token_ids.tolist(), token_logprob[:, 0].tolist()
    token_rank_l = token_rank.tolist()
    top_values_l = top_values.tolist() if max_n else None
    top_ids_l = top_ids.tolist() if max_n else None
    result = []
    for r, n in enumerate(num_logprobs):
        entry = {token_ids_l[r]: Logprob(token_lp_l[r], token_rank_l[r])}
        for j in range(min(n, max_n)):
            entry.setdefault(top_ids_l[r][j], Logprob(top_values_l[r][j], j + 1))
        result.append(entry)
    return result


def prompt_logprobs(logits: torch.Tensor, prompt_token_ids: Sequence[int],
                    num_logprobs: int) -> list[dict[int, Logprob] | None]:
    """Logprob of each prompt token given the ones before it, plus the top num_logprobs.

    logits [T, V] (row t predicts token t + 1; a last row is ignored). Entry 0 is None:
    nothing predicts the first token.
    """
    num_tokens = len(prompt_token_ids)
    if num_tokens <= 1:
        return [None] * num_tokens
    if logits.shape[0] < num_tokens - 1:
        raise ValueError(f"prompt_logprobs needs at least {num_tokens - 1} logits rows for "
                         f"{num_tokens} prompt tokens, got {logits.shape[0]}")
    logprobs = torch.log_softmax(logits[:num_tokens - 1].float(), dim=-1)  # [T-1, V]
    targets = torch.tensor(prompt_token_ids[1:], dtype=torch.long, device=logits.device)
    return [None] + _top_logprobs(logprobs, targets, [num_logprobs] * (num_tokens - 1))


class Sampler:
    """Picks the next token for every row of a batch.

    eos_token_ids: ids that end a request (masked while a row is short of min_tokens).
    generator: draws for unseeded rows; None uses torch's default generator.
    """

    def __init__(self, eos_token_ids: Sequence[int] = (),
                 generator: torch.Generator | None = None):
        self.eos_token_ids = list(eos_token_ids)
        self.generator = generator

    def __call__(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> SamplerOutput:
        if logits.dim() != 2 or logits.shape[0] != len(rows):
            raise ValueError(f"logits must be [B, V] with B = {len(rows)} rows, "
                             f"got shape {tuple(logits.shape)}")
        num_logprobs = [r.sampling_params.logprobs for r in rows]
        raw_logprobs = None
        if any(n is not None for n in num_logprobs):
            raw_logprobs = torch.log_softmax(logits.float(), dim=-1)  # [B, V], before processing
        processed, greedy_ids = process_logits(logits, rows, self.eos_token_ids)
        greedy = [r.sampling_params.is_greedy for r in rows]
        if all(greedy):
            sampled = greedy_ids
        else:
            sampled = self._draw(processed.softmax(dim=-1), rows)
            if greedy_ids is not None:
                is_greedy = torch.tensor(greedy, device=logits.device)
                sampled = torch.where(is_greedy, greedy_ids, sampled)
        return SamplerOutput(sampled, self._logprobs(raw_logprobs, sampled, num_logprobs))

    def _draw(self, probs: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        """Exponential race: argmax(p / E) with E ~ Exp(1) is a draw from p.

        Every row's noise comes from its own generator when it has one, so its draws do not
        depend on the batch around it. Greedy rows draw nothing from their generator.
        """
        noise = torch.empty_like(probs)  # [B, V]
        unseeded = [i for i, r in enumerate(rows) if r.generator is None]
        if len(unseeded) == len(rows):
            noise.exponential_(generator=self.generator)
        else:
            if unseeded:
                noise[unseeded] = torch.empty(len(unseeded), probs.shape[1], device=probs.device
                                              ).exponential_(generator=self.generator)
            for i, row in enumerate(rows):
                if row.generator is not None and not row.sampling_params.is_greedy:
                    row.generator.manual_seed(position_seed(row.sampling_params.seed, len(row.output_token_ids)))
                    noise[i].exponential_(generator=row.generator)
        # exponential_ may return exactly 0; keep p / E finite and p = 0 tokens at 0.
        noise.clamp_(min=torch.finfo(probs.dtype).tiny)
        return (probs / noise).argmax(dim=-1)

    @staticmethod
    def _logprobs(raw_logprobs: torch.Tensor | None, sampled: torch.Tensor,
                  num_logprobs: Sequence[int | None]) -> list[dict[int, Logprob] | None]:
        result: list[dict[int, Logprob] | None] = [None] * len(num_logprobs)
        wanted = [i for i, n in enumerate(num_logprobs) if n is not None]
        if raw_logprobs is None or not wanted:
            return result
        entries = _top_logprobs(raw_logprobs[wanted], sampled[wanted],
                                [num_logprobs[i] for i in wanted])
        for i, entry in zip(wanted, entries):
            result[i] = entry
        return result
