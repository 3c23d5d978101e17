"""retain_freed_memory: a large block comes from the heap and stays there when freed (glibc's
own counters, mallinfo2), where stock glibc maps it fresh and unmaps it on free."""

import json
import subprocess
import sys

import pytest

_CHILD = """
import ctypes, json, sys, torch
from glm_ray.engine.memory import retain_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
applied = retain_freed_memory() if sys.argv[1] == "retain" else None
before = libc.mallinfo2()
x = torch.ones(16 << 20)  # 64 MiB
alive = libc.mallinfo2()
del x
freed = libc.mallinfo2()
mib = 1 << 20
print(json.dumps({"applied": applied, "mapped_while_alive": (alive.hblkhd - before.hblkhd) // mib,
                  "heap_free_after": (freed.fordblks - before.fordblks) // mib}))
"""


def _run(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _CHILD, mode], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_large_blocks_stay_in_the_heap():
    stock, retained = _run("stock"), _run("retain")
    assert stock["mapped_while_alive"] >= 64 and stock["heap_free_after"] < 64  # mmap'd, unmapped on free
    assert retained["applied"] is True
    assert retained["mapped_while_alive"] == 0 and retained["heap_free_after"] >= 64  # kept for the next step
