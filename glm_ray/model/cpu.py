"""Whether this CPU multiplies bf16 matrices natively. Without AVX-512 BF16 or AMX (x86) or the
BF16 extension (Arm), torch converts every bf16 operand and a bf16 model runs ~3x slower than in
fp32 (BENCHMARKS.md): `dtype: auto` then computes a bf16 checkpoint in fp32 on such a CPU."""

from __future__ import annotations

import functools
import platform
from pathlib import Path

_X86_BF16 = {"avx512_bf16", "amx_bf16"}


def native_bf16(cpuinfo: str | None = None, machine: str | None = None) -> bool:
    """From /proc/cpuinfo's flags; True where they cannot be read (keep the checkpoint's dtype)."""
    machine = (machine or platform.machine()).lower()
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return True
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            flags.update(value.split())
    if not flags:
        return True
    if machine in ("x86_64", "amd64", "i686"):
        return bool(flags & _X86_BF16)
    if machine in ("aarch64", "arm64"):
        return "bf16" in flags
    return True


@functools.lru_cache(maxsize=1)
def this_cpu_has_native_bf16() -> bool:
    return native_bf16()
