"""Run one measurement in a fresh child process and read that process's own peak RSS.

Each system gets a spawned interpreter, so neither pays for (or benefits from) memory, threads or
caches the other left behind. Peak RSS is the child's `VmHWM` from /proc/self/status. Linux's
`ru_maxrss` is not used for it: it survives execve, so a child spawned from a large parent reports
at least the parent's size (seen here: 830 MB for a 15 MB child of an 830 MB parent). It is kept in
the result as `ru_maxrss_mib` for reference.
"""

from __future__ import annotations

import multiprocessing
import resource
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path


def peak_rss_mib() -> float | None:
    """This process's high-water resident set size, in MiB (None where /proc is missing)."""
    status = Path("/proc/self/status")
    if not status.is_file():
        return None
    for line in status.read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB
    return None


def _measured(fn: Callable[..., dict], args: tuple, kwargs: dict, num_threads: int | None) -> dict:
    if num_threads is not None:
        import torch

        torch.set_num_threads(num_threads)
    result = fn(*args, **kwargs)
    result["peak_rss_mib"] = peak_rss_mib()
    result["ru_maxrss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return result


def run_in_child(fn: Callable[..., dict], *args, num_threads: int | None = None, **kwargs) -> dict:
    """fn(*args, **kwargs) in a spawned process (with `num_threads` torch threads, if given); its dict
    result gains `peak_rss_mib`. fn must be importable by name (a module-level function)."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        try:
            return pool.submit(_measured, fn, args, kwargs, num_threads).result()
        except BrokenProcessPool:
            raise RuntimeError(f"the child process running {fn.__module__}.{fn.__qualname__} died without a result "
                               "(killed, out of memory, or crashed); its stderr above may say why") from None
