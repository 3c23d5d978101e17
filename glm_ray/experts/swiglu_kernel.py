"""The C routed-expert kernel (swiglu_kernel.c): built on first use, loaded with ctypes.

Few rows per expert (decode) is where torch's CPU matmuls lose most: each BLAS call packs the
expert's weights before using them for a handful of rows. The kernel reads each weight row once
per expert straight from the checkpoint layout (BENCHMARKS.md, issue 3). It is plain C with
OpenMP, no Python or torch headers, so it compiles in about a second with the system C compiler
into the cache beside the built-in model (`~/.cache/glm-ray/kernels/`, or `$GLM_RAY_CACHE/kernels/`),
keyed by a hash of the source and flags; the file appears by atomic rename,
so Ray workers building at once are safe. It links the same `libgomp.so.1` torch loaded, so it
runs on torch's OpenMP threads (torch.get_num_threads()) rather than a second pool.

Where it cannot run (not x86-64 Linux with AVX2 and FMA, no C compiler, `GLM_RAY_CPU_KERNEL=0`),
`load()` returns None and callers keep the torch paths; the reason is logged once.
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

import torch

from glm_ray.model.default import cache_root

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("swiglu_kernel.c")
FLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC"]
ENABLE_ENV = "GLM_RAY_CPU_KERNEL"


def cache_dir() -> Path:
    return cache_root() / "kernels"


def unavailable_reason() -> str | None:
    """Why the kernel cannot be built here, or None when it can."""
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


def build() -> Path:
    """The compiled library's path, compiling it if the cache lacks this source's build."""
    source = SOURCE.read_bytes()
    digest = hashlib.sha256(source + " ".join(FLAGS).encode()).hexdigest()[:16]
    target = cache_dir() / f"swiglu_kernel-{digest}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        proc = subprocess.run([_compiler(), *FLAGS, "-o", tmp, str(SOURCE)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"compiling {SOURCE.name} failed: {proc.stderr.strip()[-2000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


@functools.cache
def load() -> ctypes.CDLL | None:
    reason = unavailable_reason()
    if reason is None:
        try:
            lib = ctypes.CDLL(str(build()))
        except (OSError, RuntimeError) as exc:
            reason = str(exc)
    if reason is not None:
        log.info("routed experts use torch matmuls: the C kernel is unavailable (%s)", reason)
        return None
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.glm_ray_swiglu.argtypes = [p, p, i64, p, p, p, i64, i64, ctypes.c_int]
    lib.glm_ray_swiglu.restype = ctypes.c_int
    return lib


def usable(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> bool:
    """The kernel handles fp32 CPU tensors in their contiguous checkpoint layout."""
    return (
        x.dtype == w13.dtype == w2.dtype == torch.float32
        and x.device.type == w13.device.type == w2.device.type == "cpu"
        and w13.is_contiguous() and w2.is_contiguous()
        and load() is not None
    )


def swiglu(x: torch.Tensor, counts: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """x [P, H] fp32, rows sorted by expert; counts [E] rows per expert; w13 [E, 2I, H], w2 [E, H, I]
    -> [P, H] fp32, row r = W2_e (silu(W1_e x_r) * W3_e x_r) for r's expert e."""
    lib = load()
    x = x.contiguous()
    counts = counts.to(torch.int64).contiguous()
    e, two_i, h = w13.shape
    if x.shape[1] != h or w2.shape != (e, h, two_i // 2) or counts.numel() != e or int(counts.sum()) != x.shape[0]:
        raise ValueError(f"swiglu: shapes do not agree: x {tuple(x.shape)}, counts {tuple(counts.shape)} "
                         f"summing to {int(counts.sum())}, w13 {tuple(w13.shape)}, w2 {tuple(w2.shape)}")
    y = torch.empty_like(x)
    if x.shape[0] == 0:
        return y
    rc = lib.glm_ray_swiglu(x.data_ptr(), counts.data_ptr(), e, w13.data_ptr(), w2.data_ptr(), y.data_ptr(),
                            h, two_i // 2, torch.get_num_threads())
    if rc != 0:
        raise MemoryError("swiglu kernel: could not allocate its scratch memory")
    return y
