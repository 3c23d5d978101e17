"""Threads that share the attention side's heavy calls: the engine thread and `n - 1` helpers.

For an engine whose torch runs a single intra-op thread: the attention replica, whose layers wait
on remote experts. There, torch's OpenMP team would sleep through every expert wait and be woken
at each of a layer's dozens of small ops; a helper here is woken only for the heavy ones: a
layer's attention calls (prefill chunks, decode buckets, `run`) and the rows of its projections
(`linear`), while the small ops between them stay on one thread. Each call, and each row of a
projection, is computed exactly as on the engine thread alone, so results do not depend on `n`.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import TypeVar

import torch
import torch.nn.functional as F

from glm_ray.model.layers import Linear

T = TypeVar("T")

# fewer rows stay on the engine thread: a helper's wake-up (tens of µs, more on a busy core) would
# eat most of what sharing them saves
MIN_SPLIT_ROWS = 64


def balance(costs: list[float], n: int) -> list[list[int]]:
    """Indices of `costs` in `n` shares of about equal total: the costliest first, each to the
    share with the least so far. Share 0 is the caller's."""
    shares: list[list[int]] = [[] for _ in range(n)]
    totals = [0.0] * n
    for i in sorted(range(len(costs)), key=lambda i: -costs[i]):
        j = totals.index(min(totals))
        shares[j].append(i)
        totals[j] += costs[i]
    return shares


def _run(calls: list[Callable[[], T]]) -> list[T]:
    with torch.inference_mode():  # thread-local: the engine thread's mode does not reach helpers
        return [call() for call in calls]


class AttentionWorkers:
    def __init__(self, n: int):
        if n < 2:
            raise ValueError(f"AttentionWorkers needs n >= 2 threads (the caller's and a helper), got {n}")
        self.n = n
        self._pool = ThreadPoolExecutor(n - 1, thread_name_prefix="glm-ray-attention")

    def run(self, calls: list[tuple[float, Callable[[], T]]]) -> list[T]:
        """[(cost, call)] -> the calls' results, in no particular order; the caller's thread runs
        one share, helpers the others."""
        if len(calls) < 2:
            return [call() for _, call in calls]
        shares = balance([cost for cost, _ in calls], self.n)
        futures = [self._pool.submit(_run, [calls[i][1] for i in share]) for share in shares[1:] if share]
        results = [calls[i][1]() for i in shares[0]]
        for future in futures:
            results += future.result()
        return results

    def close(self) -> None:
        self._pool.shutdown(wait=False)

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """F.linear(x, weight, bias) for x [M, K], its rows in `n` runs, one per thread; each row
        comes out bit-identical to the unsplit product (row blocks of one GEMM)."""
        m = x.shape[0]
        if x.dim() != 2 or m < MIN_SPLIT_ROWS or not x.is_contiguous():
            return F.linear(x, weight, bias)
        out = torch.empty(m, weight.shape[0], dtype=x.dtype, device=x.device)  # [M, N]
        w_t = weight.t()

        def rows(a: int, b: int) -> None:
            if bias is None:
                torch.mm(x[a:b], w_t, out=out[a:b])
            else:
                torch.addmm(bias, x[a:b], w_t, out=out[a:b])

        bounds = [round(i * m / self.n) for i in range(self.n + 1)]
        self.run([(b - a, partial(rows, a, b)) for a, b in zip(bounds, bounds[1:])])  # one run per thread
        return out


def share_projections(model: torch.nn.Module, workers: AttentionWorkers) -> int:
    """Let `workers` split the rows of the model's projections (attention, dense MLPs); not the
    shared experts', which run while remote routed experts hold the other cores. Returns how many."""
    shared = 0
    for name, module in model.named_modules():
        if isinstance(module, Linear) and ".shared_experts." not in f".{name}.":
            module.workers = workers
            shared += 1
    return shared
