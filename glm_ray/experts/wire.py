"""Tensors to and from the `glm_ray.v1.Tensor` message: raw bytes, dtype name and shape.

Never pickle (design.md, "Wire formats"). Data is the tensor's row-major bytes in the host's
byte order (little-endian on every platform we run); bfloat16, which numpy lacks, travels as its
int16 bit pattern. Decoding does not copy: the tensor shares the message's bytes and must be
treated as read-only.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch

from glm_ray.v1 import experts_pb2 as pb

# gRPC's default 4 MiB cap is far below a prefill batch; server and client both use this.
MAX_MESSAGE_BYTES = 256 << 20
GRPC_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
    "int64": torch.int64, "int32": torch.int32, "int16": torch.int16,
}
_NAMES = {v: k for k, v in DTYPES.items()}

# Decoded tensors alias the (immutable) message bytes on purpose. torch warns about that once per
# process: have it happen here, silenced, rather than at the first decode.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)
    torch.frombuffer(b"\0\0\0\0", dtype=torch.float32)


def dtype_name(dtype: torch.dtype) -> str:
    if dtype not in _NAMES:
        raise ValueError(f"dtype {dtype} cannot cross the wire; use one of {', '.join(DTYPES)}")
    return _NAMES[dtype]


def tensor_to_proto(tensor: torch.Tensor, out: pb.Tensor | None = None) -> pb.Tensor:
    """Fill `out` (or a new message) with tensor's dtype, shape and bytes."""
    name = dtype_name(tensor.dtype)
    t = tensor.detach().to("cpu")
    return array_to_proto((t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy(), name, out)


def array_to_proto(array: np.ndarray, dtype: str, out: pb.Tensor | None = None) -> pb.Tensor:
    """The same from a numpy array (the hot path splits batches in numpy: far fewer µs per op than
    torch on small tensors); a "bfloat16" array is its int16 view."""
    if dtype not in DTYPES or DTYPES[dtype].itemsize != array.itemsize:
        raise ValueError(f"a numpy {array.dtype} array cannot be sent as {dtype!r}")
    out = pb.Tensor() if out is None else out
    out.dtype = dtype
    out.shape[:] = array.shape
    out.data = array.tobytes()  # C order, whatever the array's strides
    return out


def tensor_from_proto(msg: pb.Tensor, *, what: str = "tensor") -> torch.Tensor:
    """The tensor a message holds; ValueError naming `what` if dtype or byte count is wrong."""
    if msg.dtype not in DTYPES:
        raise ValueError(f"{what}: unknown dtype {msg.dtype!r} (expected one of {', '.join(DTYPES)})")
    dtype = DTYPES[msg.dtype]
    shape = tuple(msg.shape)
    if any(n < 0 for n in shape):
        raise ValueError(f"{what}: negative dimension in shape {list(shape)}")
    data = msg.data  # each access to a bytes field makes a new object: read it once
    numel = math.prod(shape)
    want = numel * dtype.itemsize
    if len(data) != want:
        raise ValueError(f"{what}: {len(data)} bytes of data, but shape {list(shape)} of {msg.dtype} "
                         f"needs {want}")
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    raw_dtype = torch.int16 if dtype == torch.bfloat16 else dtype
    t = torch.frombuffer(data, dtype=raw_dtype).view(shape)
    return t.view(torch.bfloat16) if dtype == torch.bfloat16 else t
