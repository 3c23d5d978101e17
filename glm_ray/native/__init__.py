"""glm-ray's C kernels: plain C with AVX2 + FMA and OpenMP, built on first use, loaded with ctypes.

Each kernel's source sits beside the module that binds it (`experts/swiglu_kernel.c`,
`engine/decode_attention.c`) and includes `simd.h` from here. No Python or torch headers, so a
kernel compiles in about a second with the system C compiler into the cache beside the built-in
model (`~/.cache/glm-ray/kernels/`, or `$GLM_RAY_CACHE/kernels/`), keyed by a hash of its source,
the header and the flags; the file appears by atomic rename, so Ray workers building at once are
safe. It links the same `libgomp.so.1` torch loaded, so it runs on the calling thread's OpenMP
team (torch.get_num_threads() threads, or the engine's `kernel_threads`) rather than a second
pool. ctypes drops the GIL for the call.

Where the kernels cannot run (not x86-64 Linux with AVX2 and FMA, no C compiler,
`GLM_RAY_CPU_KERNEL=0`), `load()` returns None and callers keep their torch paths; the reason is
logged once per kernel.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

from glm_ray.model.default import cache_root

log = logging.getLogger(__name__)

HEADER = Path(__file__).with_name("simd.h")
FLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC"]
ENABLE_ENV = "GLM_RAY_CPU_KERNEL"


def cache_dir() -> Path:
    return cache_root() / "kernels"


def unavailable_reason() -> str | None:
    """Why the kernels cannot be built here, or None when they can."""
    if os.environ.get(ENABLE_ENV, "1") == "0":
        return f"{ENABLE_ENV}=0"
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return f"needs x86-64 Linux, this is {platform.system()} {platform.machine()}"
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return "cannot read CPU flags from /proc/cpuinfo"
    missing = [f for f in ("avx2", "fma") if f not in flags.split()]
    if missing:
        return f"the CPU lacks {', '.join(missing)}"
    if _compiler() is None:
        return "no C compiler (cc, gcc or $CC) on PATH"
    return None


def _compiler() -> str | None:
    """$CC, else cc, else gcc: the first found on PATH."""
    found = (shutil.which(name) for name in (os.environ.get("CC"), "cc", "gcc") if name)
    return next((path for path in found if path), None)


def build(source: Path) -> Path:
    """The compiled library of `source`, compiling it if the cache lacks this build."""
    digest = hashlib.sha256(source.read_bytes() + HEADER.read_bytes() + " ".join(FLAGS).encode()).hexdigest()[:16]
    target = cache_dir() / f"{source.stem}-{digest}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        proc = subprocess.run([_compiler(), *FLAGS, f"-I{HEADER.parent}", "-o", tmp, str(source)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"compiling {source.name} failed: {proc.stderr.strip()[-2000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


@functools.cache
def load(source: Path, what: str) -> ctypes.CDLL | None:
    """The kernel library of `source`, or None where it cannot run (`what` names it in the log)."""
    reason = unavailable_reason()
    if reason is None:
        try:
            return ctypes.CDLL(str(build(source)))
        except (OSError, RuntimeError) as exc:
            reason = str(exc)
    log.info("%s use torch: the C kernel is unavailable (%s)", what, reason)
    return None
