"""Tensors cross the wire unchanged, bad messages are named, and the generated stubs match protos/."""

from pathlib import Path

import pytest
import torch

from glm_ray.experts.wire import GRPC_OPTIONS, MAX_MESSAGE_BYTES, tensor_from_proto, tensor_to_proto
from glm_ray.v1 import experts_pb2 as pb

PROTOS = Path(__file__).resolve().parents[2] / "protos"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.int32,
                                   torch.int16])
@pytest.mark.parametrize("shape", [(5, 7), (3,), (0, 4), (2, 3, 4)])
def test_round_trip_is_exact(dtype, shape):
    g = torch.Generator().manual_seed(0)
    t = (torch.randn(shape, generator=g) * 1000).to(dtype)
    back = tensor_from_proto(pb.Tensor.FromString(tensor_to_proto(t).SerializeToString()))
    assert back.dtype == dtype and back.shape == t.shape
    assert torch.equal(back, t)


def test_bfloat16_keeps_every_bit_pattern():
    bits = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16)  # NaNs, infs, subnormals too
    t = bits.view(torch.bfloat16)
    msg = tensor_to_proto(t)
    assert msg.dtype == "bfloat16" and len(msg.data) == 2 * t.numel()
    assert torch.equal(tensor_from_proto(msg).view(torch.int16), bits)


def test_non_contiguous_input_is_sent_in_logical_order():
    t = torch.arange(12, dtype=torch.float32).view(3, 4).t()
    assert torch.equal(tensor_from_proto(tensor_to_proto(t)), t)


def test_encoding_fills_a_field_in_place():
    req = pb.ForwardRequest(layer=2)
    tensor_to_proto(torch.ones(2, 3), req.hidden_states)
    assert list(req.hidden_states.shape) == [2, 3] and req.hidden_states.dtype == "float32"


def test_bad_messages_are_named():
    with pytest.raises(ValueError, match=r"hidden_states: 8 bytes of data, but shape \[3\] of float32 needs 12"):
        tensor_from_proto(pb.Tensor(dtype="float32", shape=[3], data=bytes(8)), what="hidden_states")
    with pytest.raises(ValueError, match="local_ids: unknown dtype 'uint7'"):
        tensor_from_proto(pb.Tensor(dtype="uint7", shape=[1], data=b"x"), what="local_ids")
    with pytest.raises(ValueError, match="negative dimension"):
        tensor_from_proto(pb.Tensor(dtype="int16", shape=[-1], data=b""))
    with pytest.raises(ValueError, match="cannot cross the wire"):
        tensor_to_proto(torch.zeros(2, dtype=torch.complex64))


def test_message_limits_are_explicit_and_large():
    assert MAX_MESSAGE_BYTES >= 64 << 20
    assert dict(GRPC_OPTIONS) == {"grpc.max_send_message_length": MAX_MESSAGE_BYTES,
                                  "grpc.max_receive_message_length": MAX_MESSAGE_BYTES}


def test_generated_module_matches_the_proto(tmp_path):
    """The installed experts_pb2 was compiled from today's experts.proto (else: pip install -e . again)."""
    from google.protobuf import descriptor_pb2
    from grpc_tools import protoc

    out = tmp_path / "set.pb"
    assert protoc.main(["protoc", f"-I{PROTOS}", f"--descriptor_set_out={out}",
                        str(PROTOS / "glm_ray/v1/experts.proto")]) == 0
    fresh = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file[0]
    for message in fresh.message_type:  # generated code leaves out the derived json names
        for f in message.field:
            f.ClearField("json_name")
    installed = descriptor_pb2.FileDescriptorProto.FromString(pb.DESCRIPTOR.serialized_pb)
    assert installed == fresh, "glm_ray/v1/experts_pb2.py is stale: run `pip install -e .` to regenerate it"
