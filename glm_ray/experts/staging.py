"""Host buffers for tensors that cross between a GPU and the wire, reused from call to call.

The wire format is host bytes (experts/wire.py), so a GPU replica copies each MoE layer's
hidden states, ids and weights to the host and the reply back. Fresh host tensors per layer
would cost a pageable allocation and a staged copy each; instead each named slot keeps pinned
buffers that grow to the largest size seen and are then reused: no allocation per layer once
warm. Device-to-host copies finish before returning (the bytes are needed at once); a
host-to-device copy is queued on a side stream and the caller's stream waits for it there,
while the buffer stays reserved until that copy is done (a small ring per slot).
On a CPU device there is nothing to stage: tensors pass through untouched.
"""

from __future__ import annotations

import threading

import torch

RING = 4  # host-to-device buffers per slot: one per MoE layer in flight at once, with room


class HostStaging:
    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.active = self.device.type == "cuda"
        self._buffers: dict[tuple[str, int], torch.Tensor] = {}  # (slot, ring index) -> uint8 host buffer
        self._events: dict[tuple[str, int], object] = {}  # (slot, ring index) -> event of its last copy
        self._turn: dict[str, int] = {}
        self._lock = threading.Lock()
        self._stream = torch.cuda.Stream(self.device) if self.active else None
        self.allocations = 0  # host buffers made so far (stays flat once warm)

    def buffer(self, slot: str, shape: tuple[int, ...], dtype: torch.dtype, index: int = 0) -> torch.Tensor:
        """A host tensor of `shape` over slot's reused storage (pinned on CUDA); contents undefined."""
        nbytes = max(1, int(torch.Size(shape).numel()) * dtype.itemsize)
        key = (slot, index)
        with self._lock:
            buf = self._buffers.get(key)
            if buf is None or buf.numel() < nbytes:
                size = 1 << (nbytes - 1).bit_length()  # grow by powers of two: few regrowths
                buf = torch.empty(size, dtype=torch.uint8, pin_memory=self.active)
                self._buffers[key] = buf
                self.allocations += 1
        return buf[:nbytes].view(dtype)[:int(torch.Size(shape).numel())].view(shape)

    def to_host(self, slot: str, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` on the host: itself when it is there, else a copy in slot's buffer, valid until
        the next call for the same slot."""
        if tensor.device.type == "cpu":
            return tensor
        out = self.buffer(slot, tuple(tensor.shape), tensor.dtype)
        out.copy_(tensor)  # synchronous: the caller serialises these bytes next
        return out

    def reserve(self, slot: str, shape: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, int]:
        """(a host tensor to fill, its ring index) for `upload`: the ring's next buffer of slot,
        once its previous copy to the device is done."""
        with self._lock:
            index = self._turn.get(slot, 0)
            self._turn[slot] = (index + 1) % RING
        event = self._events.pop((slot, index), None)
        if event is not None:
            event.synchronize()
        return self.buffer(f"{slot}>device", shape, dtype, index), index

    def upload(self, slot: str, index: int, host: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Queue the copy of a `reserve`d buffer to the device; the caller's stream waits for it."""
        current = torch.cuda.current_stream(self.device)
        self._stream.wait_stream(current)
        with torch.cuda.stream(self._stream):
            out = host.to(self.device, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self._stream)
        self._events[(slot, index)] = done
        current.wait_stream(self._stream)
        out.record_stream(current)  # made on the side stream, used on the caller's
        return out if out.dtype == dtype else out.to(dtype)

    def to_device(self, slot: str, host: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """`host` (a CPU tensor) on this device in `dtype`; on CPU, `host.to(dtype)` itself."""
        dtype = dtype or host.dtype
        if not self.active:
            return host.to(dtype)
        staged, index = self.reserve(slot, tuple(host.shape), host.dtype)
        staged.copy_(host)
        return self.upload(slot, index, staged, dtype)
