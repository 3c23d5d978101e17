"""Keep freed memory in the process instead of handing it back to the OS after every step.

By default glibc serves allocations above its mmap threshold (128 KiB, raised at run time up to
32 MiB) with fresh `mmap`s, unmaps them on free, and trims the heap top when more than twice that
is free; a step's large temporaries (expert activations of a 2048-token prefill are 8-16 MiB
each, gathered K/V blocks of long decodes 20+ MiB) are then page-faulted in again on every step.
On the 2-core dev VM that made a 64 x 32-token prefill step 20-50% slower. Raising both
thresholds serves those blocks from the heap and keeps them there: what tcmalloc or jemalloc give
CPU inference servers. The cost is that RSS stays at the peak working set between steps.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 256 << 20  # blocks below this come from the heap
TRIM_THRESHOLD = 1 << 30  # free heap above this goes back to the OS

_applied = False


def retain_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds for this process (idempotent). Returns whether the
    allocator took them: False off glibc (macOS, musl), where this is a no-op."""
    global _applied
    if _applied:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _applied = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _applied
