"""Routed experts computed in-process, batched per layer.

Pairs (token, expert) are sorted by expert so each active expert runs one matmul over all of its
tokens; there is no per-token Python loop. `reference_moe` beside it is the plain definition a test
holds it equal to. Legend: T tokens, K top-k, P = T*K pairs, E experts held, H hidden, I expert width.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable

import torch
import torch.nn.functional as F

from glm_ray.experts import swiglu_kernel
from glm_ray.experts.backend import ExpertBackend
from glm_ray.experts.compute import GROUPED_MM, ExpertCompute, select_compute
from glm_ray.experts.compute import grouped_mm_experts as _grouped_mm_experts
from glm_ray.experts.compute import looped_experts as _looped_experts


class ExpertWeights:
    """One MoE layer's experts held here: w13 [E, 2I, H] (gate rows then up rows), w2 [E, H, I].
    compute_dtype: the dtype they compute in (default: the weights'); on CPU, bf16 weights may
    compute in fp32 (model/loader.py `compact_experts`: widened as read, the same bits as upcast)."""

    def __init__(self, expert_ids: Iterable[int], w13: torch.Tensor, w2: torch.Tensor, num_experts: int,
                 compute_dtype: torch.dtype | None = None):
        self.expert_ids = list(expert_ids)
        self.w13, self.w2 = w13, w2
        self.compute_dtype = compute_dtype or w13.dtype
        # global id -> local slot, -1 where the expert lives elsewhere
        self.slot = torch.full((num_experts,), -1, dtype=torch.long)
        self.slot[torch.tensor(self.expert_ids, dtype=torch.long)] = torch.arange(len(self.expert_ids))

    def numel(self) -> int:
        return self.w13.numel() + self.w2.numel()

    def to_slots_on(self, device: torch.device) -> ExpertWeights:
        """Keep the slot table beside the weights (it indexes on their device)."""
        self.slot = self.slot.to(device)
        return self


def grouped_swiglu(hidden_states: torch.Tensor, local_ids: torch.Tensor, weights: torch.Tensor,
                   w13: torch.Tensor, w2: torch.Tensor, kernel_threads: int | None = None) -> torch.Tensor:
    """hidden_states [T, H]; local_ids/weights [T, K] (slots into w13/w2; -1 = skip) -> [T, H] in fp32.
    kernel_threads: the C kernel's threads (None: torch's)."""
    use_kernel = swiglu_kernel.usable(hidden_states, w13, w2)
    if use_kernel:  # up to KERNEL_MAX_ROWS an expert: the whole layer in C
        out = swiglu_kernel.moe(hidden_states, local_ids, weights, w13, w2, max_rows=KERNEL_MAX_ROWS,
                                threads=kernel_threads)
        if out is not None:
            return out
    t, k = local_ids.shape
    flat_ids = local_ids.reshape(-1)  # [P]
    order = torch.argsort(flat_ids, stable=True)
    sorted_ids = flat_ids[order]
    skipped = int((sorted_ids < 0).sum())  # skipped pairs sort first and stay zero
    order, sorted_ids = order[skipped:], sorted_ids[skipped:]
    counts = torch.bincount(sorted_ids, minlength=w13.shape[0])
    x = hidden_states.index_select(0, order // k)  # [P', H], grouped by expert (4x faster than x[idx] on CPU)
    if w13.dtype != hidden_states.dtype:  # held narrower than they compute in: torch's matmuls on widened copies
        y = _widened_experts(_experts_path(counts), x, counts, w13, w2, hidden_states.dtype)
    else:
        y = _experts_path(counts)(x, counts, w13, w2)
    if use_kernel and swiglu_kernel.combine_matches_torch(k, hidden_states.shape[1]):  # the rest in one C pass
        return swiglu_kernel.combine(y, order, t, k, weights, threads=kernel_threads)
    # un-sort with one row scatter, then add each token's K pairs (no index_add_, which is slow on CPU)
    pairs = torch.zeros(t * k, hidden_states.shape[1], dtype=torch.float32, device=x.device)
    pairs[order] = y * weights.reshape(-1)[order, None].float()
    return pairs.view(t, k, -1).sum(dim=1)


WIDEN_BYTES = 256 << 20  # widened weights at a time, per thread (a buffer it keeps and reuses)
_scratch = threading.local()


def _widened_experts(run, x, counts, w13, w2, dtype: torch.dtype) -> torch.Tensor:
    """`run(x, counts, w13, w2)` (a torch path: each expert's rows through its own matmuls) over
    weights held in bf16 that compute in `dtype`: the experts that have rows, widened (exactly) a
    chunk of at most WIDEN_BYTES at a time into a buffer this thread reuses (a fresh one costs ~8x
    the copy on CPU, in page faults), so neither idle experts nor a whole layer of a large model
    are copied. Each expert's rows meet the same matmul as with weights held in `dtype`: the same
    bits (the chunks split between experts, never inside one)."""
    active = torch.nonzero(counts).flatten().tolist()
    per_expert = (w13[0].numel() + w2[0].numel()) * dtype.itemsize
    chunk = max(1, WIDEN_BYTES // per_expert)
    ys, row = [], 0
    for start in range(0, len(active), chunk):
        ids = active[start:start + chunk]
        b13, b2 = _widen_buffers(len(ids), w13.shape[1:], w2.shape[1:], dtype, w13.device)
        j = 0
        for first, last in _runs(ids):  # a copy per run of consecutive experts
            b13[j:j + last - first].copy_(w13[first:last])
            b2[j:j + last - first].copy_(w2[first:last])
            j += last - first
        c = counts[ids]
        n = int(c.sum())
        ys.append(run(x[row:row + n], c, b13, b2))
        row += n
    return ys[0] if len(ys) == 1 else torch.cat(ys) if ys else x.new_zeros(0, w2.shape[1])


def _runs(ids: list[int]):
    """(first, last + 1) of each run of consecutive ids, in order."""
    start = 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or ids[i] != ids[i - 1] + 1:
            yield ids[start], ids[i - 1] + 1
            start = i


def _widen_buffers(n: int, shape13, shape2, dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """[n, *shape13] and [n, *shape2] views of this thread's reused buffers (grown when too small)."""
    need = n * (shape13.numel() + shape2.numel())
    flat = getattr(_scratch, "flat", None)
    if flat is None or flat.numel() < need or flat.dtype != dtype or flat.device != device:
        with torch.inference_mode(False):  # a normal tensor: writable in and outside inference mode
            flat = _scratch.flat = torch.empty(need, dtype=dtype, device=device)
    return (flat[:n * shape13.numel()].view(n, *shape13),
            flat[n * shape13.numel():need].view(n, *shape2))


_HAS_GROUPED_MM = GROUPED_MM is not None
PADDED_MAX_ROWS = 32  # up to this many tokens per expert, one padded bmm beats grouped_mm on CPU
# up to this many rows an expert (decode, small prefills), the C kernel; beyond (large prefills), the torch
# paths. The kernel is about as fast there too (2048 tokens: 99.8 ms against 112 on one thread), but prefill
# through it parted one of workload B's 256 greedy outputs from transformers' (BENCHMARKS.md, issue 18),
# while this split keeps all 256 identical
KERNEL_MAX_ROWS = 96


def _experts_path(counts: torch.Tensor):
    """The torch path for the experts' rows, where the C kernel (`swiglu_kernel.moe`, tried first
    by `grouped_swiglu`) cannot run or declined. Few tokens per expert (decode) is memory bound: a
    padded batched matmul over all experts streams the weights fastest, as long as nearly every
    expert has work (an idle expert's weights would be read for nothing). Otherwise grouped_mm
    runs each expert on exactly its rows."""
    if not _HAS_GROUPED_MM:
        return _looped_experts
    if counts.numel() and int(counts.max()) <= PADDED_MAX_ROWS and 4 * int((counts > 0).sum()) >= 3 * counts.numel():
        return _padded_experts
    return _grouped_mm_experts


def _padded_experts(x, counts, w13, w2) -> torch.Tensor:
    """Rows of each expert packed into [E, max count, H] (zeros after its own), two bmm calls."""
    if x.shape[0] == 0:
        return x.float()
    e = counts.numel()
    expert = torch.repeat_interleave(torch.arange(e), counts)  # [P'] expert of each sorted row
    within = torch.arange(x.shape[0]) - (torch.cumsum(counts, 0) - counts)[expert]  # row inside its expert
    packed = x.new_zeros(e, int(counts.max()), x.shape[1])
    packed[expert, within] = x
    gate, up = torch.bmm(packed, w13.transpose(1, 2)).chunk(2, dim=-1)
    return torch.bmm(F.silu(gate) * up, w2.transpose(1, 2))[expert, within].float()


def reference_moe(hidden_states, topk_ids, topk_weights, experts: dict[int, tuple[torch.Tensor, torch.Tensor]]):
    """The definition, one (token, k) pair at a time: for tests only."""
    out = torch.zeros(hidden_states.shape, dtype=torch.float32)
    for t in range(hidden_states.shape[0]):
        for k in range(topk_ids.shape[1]):
            e = int(topk_ids[t, k])
            if e not in experts:
                continue
            w13, w2 = experts[e]
            gate, up = (w13 @ hidden_states[t]).chunk(2)
            out[t] += topk_weights[t, k] * (w2 @ (F.silu(gate) * up)).float()
    return out


class LocalExperts(ExpertBackend):
    """All (or a chosen subset of) routed experts of every MoE layer, in this process, computed
    by `compute` (experts/compute.py; default: `auto` for the weights' device)."""

    def __init__(self, layers: dict[int, ExpertWeights], compute: ExpertCompute | None = None):
        self.layers = layers
        if compute is None:
            first = next(iter(layers.values()), None)
            compute = select_compute("auto", first.w13.device if first is not None else torch.device("cpu"))
        self.compute = compute
        self.compute_s = 0.0  # cumulative time in expert compute, for benchmarks (GPU: time to launch)

    def forward(self, layer, hidden_states, topk_ids, topk_weights):
        return self.partial_forward(layer, hidden_states, topk_ids, topk_weights).to(hidden_states.dtype)

    def partial_forward(self, layer, hidden_states, topk_ids, topk_weights) -> torch.Tensor:
        """The fp32 weighted sum over the experts held here; pairs for other experts contribute 0."""
        held = self.layers[layer]
        start = time.perf_counter()
        out = self.compute(hidden_states, held.slot[topk_ids], topk_weights, held,
                           all_held=len(held.expert_ids) == held.slot.numel())
        self.compute_s += time.perf_counter() - start
        return out

    def numel(self) -> int:
        return sum(w.numel() for w in self.layers.values())
