"""Where a process computes: the `device` option (`auto` | `cpu` | `cuda` | `cuda:N`).

`auto` takes the GPU when there is one to take: in-process, when torch sees CUDA; in a Ray
replica, when Ray gave the replica a GPU (`num_gpus` in its resources), since a replica that
reserved none must not compute on a GPU another replica reserved. Everything else is CPU.
"""

from __future__ import annotations

import re

import torch

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"
_PATTERN = re.compile(r"^(auto|cpu|cuda)(?::(\d+))?$")


def check_device(value: str) -> str:
    """The option as given, or ValueError naming it; `auto` and `cpu` take no index."""
    m = _PATTERN.match(value) if isinstance(value, str) else None
    if m is None or (m.group(2) is not None and m.group(1) != "cuda"):
        raise ValueError(f"device must be {DEVICE_CHOICES}, got {value!r}")
    return value


def resolve_device(value: str, *, gpus_assigned: int | None = None) -> torch.device:
    """The torch device `value` names here. gpus_assigned: GPUs Ray gave this replica (None: not a
    Ray replica). ValueError when CUDA is asked for and absent, naming what is missing."""
    check_device(value)
    cuda = torch.cuda.is_available()
    if value == "auto":
        wants_gpu = cuda if gpus_assigned is None else (cuda and gpus_assigned > 0)
        return torch.device("cuda", torch.cuda.current_device()) if wants_gpu else torch.device("cpu")
    if value == "cpu":
        return torch.device("cpu")
    if not cuda:
        why = ("this torch was built without CUDA" if torch.version.cuda is None
               else "torch sees no GPU (check CUDA_VISIBLE_DEVICES and the driver)")
        raise ValueError(f"device {value!r}: CUDA is not available ({why}); use device cpu or auto")
    index = int(value.split(":")[1]) if ":" in value else torch.cuda.current_device()
    if index >= torch.cuda.device_count():
        raise ValueError(f"device {value!r}: only {torch.cuda.device_count()} GPU(s) visible here "
                         f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
    return torch.device("cuda", index)


def ray_gpus_assigned() -> int | None:
    """GPUs Ray assigned to the calling actor, None outside a Ray worker."""
    try:
        import ray
    except ImportError:
        return None
    if not ray.is_initialized():
        return None
    return len(ray.get_gpu_ids())


def synchronize(device: torch.device) -> None:
    """Wait for queued work on `device` (timing only; a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
