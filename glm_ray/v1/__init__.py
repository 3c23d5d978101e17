"""Generated gRPC/protobuf modules for `protos/glm_ray/v1/*.proto` (experts_pb2, experts_pb2_grpc).

They are compiled at install time by setup.py's `build_protos` step and are not checked in;
after editing a .proto, run `pip install -e .` again.
"""
