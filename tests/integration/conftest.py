"""One local Ray cluster with Serve (HTTP and gRPC proxies) for the whole test session."""

import os
import socket

import pytest

GRPC_SERVICERS = ["glm_ray.v1.generate_pb2_grpc.add_GenerationServicer_to_server"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def serve_endpoints():
    """(HTTP base URL, gRPC target) of Serve's proxies on a fresh local cluster."""
    ray = pytest.importorskip("ray")
    from ray import serve

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    http_port, grpc_port = free_port(), free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": http_port},
                grpc_options={"port": grpc_port, "grpc_servicer_functions": GRPC_SERVICERS})
    yield f"http://127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}"
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="session")
def ray_serve(serve_endpoints):
    return serve_endpoints[0]


@pytest.fixture(scope="session")
def grpc_target(serve_endpoints):
    return serve_endpoints[1]
