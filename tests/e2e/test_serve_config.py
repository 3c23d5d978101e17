"""One config, two ways to run it: `glm-ray config` writes a Serve config file, and `glm-ray serve
--config` of that very file serves it (the `serve deploy` of the same file on a `ray start --head`
cluster is tests/e2e/test_ray_up.py). The file turns API keys on: HTTP and gRPC answer only with a
key, /health stays open without showing expert addresses."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys

import grpc
import pytest
import requests
import yaml
from serve_process import ServeProcess

from glm_ray.serving.config import ServeConfig
from glm_ray.v1 import generate_pb2 as pb
from glm_ray.v1 import generate_pb2_grpc as pb_grpc

openai = pytest.importorskip("openai")
KEY = "serve-config-test-key-42"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def glm_ray(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "GLM_RAY_API_KEY"}
    return subprocess.run([sys.executable, "-m", "glm_ray.cli", *args], capture_output=True, text=True, timeout=120,
                          env=env)


def test_config_flags_name_the_bad_value(tmp_path):
    r = glm_ray("config", "--set", "expert_groups=many")
    assert r.returncode != 0 and "expert_groups" in r.stderr and "many" in r.stderr
    r = glm_ray("config", "--set", "no_such_field=1")
    assert r.returncode != 0 and "no_such_field" in r.stderr
    r = glm_ray("config", "--set", "attention_resources")
    assert r.returncode != 0 and "FIELD=VALUE" in r.stderr
    r = glm_ray("config", "--model", str(tmp_path))
    assert r.returncode != 0 and "no config.json" in r.stderr
    r = glm_ray("config", "--set", "cluster_secret_file=/nonexistent/secret", "--no-cluster-secret")
    assert r.returncode == 0  # read where the app is built, not here


@pytest.fixture(scope="module")
def written(tiny_model_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("serve-config") / "glm-ray.yaml"
    http_port, grpc_port = free_port(), free_port()
    r = glm_ray("config", "--model", str(tiny_model_dir), "--http-port", str(http_port), "--grpc-port",
                str(grpc_port), "--api-key", KEY, "--set", "dtype=float32", "--set", "kv_cache_memory=33554432",
                "--out", str(path))
    assert r.returncode == 0, r.stderr
    return path, http_port, grpc_port


def test_the_written_file(written, tiny_model_dir):
    path, http_port, grpc_port = written
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # it holds secrets
    data = yaml.safe_load(path.read_text())
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(data)
    assert data["http_options"] == {"host": "127.0.0.1", "port": http_port}
    assert data["grpc_options"]["port"] == grpc_port
    cfg = ServeConfig.from_yaml(path)
    assert cfg.model == str(tiny_model_dir) and cfg.dtype == "float32" and cfg.kv_cache_memory == 32 << 20
    assert [k.get_secret_value() for k in cfg.api_keys] == [KEY]
    assert len(cfg.cluster_secret.get_secret_value()) >= 32  # generated: redeploying the file keeps it
    again = yaml.safe_load(glm_ray("config", "--config", str(path)).stdout)  # a round trip keeps every field
    assert again["applications"][0]["args"] == data["applications"][0]["args"]


def test_serve_config_of_the_written_file(written, tiny_model_dir):
    path, http_port, grpc_port = written
    server = ServeProcess("--config", str(path))
    try:
        assert f"http://127.0.0.1:{http_port}/v1" in server.banner and "API keys    1 configured" in server.banner
        url = f"http://127.0.0.1:{http_port}"
        health = requests.get(f"{url}/health", timeout=30)
        assert health.status_code == 200 and health.json()["replicas"] == {"0": 1, "1": 1}
        assert requests.get(f"{url}/v1/models", timeout=30).status_code == 401
        assert requests.get(f"{url}/v1/experts", timeout=30).status_code == 401
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
        out = client.completions.create(model=tiny_model_dir.name, prompt="Hello", max_tokens=4, temperature=0)
        assert out.usage.completion_tokens == 4 or out.choices[0].finish_reason == "stop"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()

        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            stub = pb_grpc.GenerationStub(channel)
            request = pb.GenerateRequest(prompt="Hello", sampling=pb.SamplingOptions(max_tokens=4, temperature=0))
            with pytest.raises(grpc.RpcError) as info:
                list(stub.Generate(request, timeout=60))
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            replies = list(stub.Generate(request, metadata=(("authorization", f"Bearer {KEY}"),), timeout=60))
            assert replies[-1].usage.completion_tokens == out.usage.completion_tokens
            assert "".join(r.text for r in replies) == out.choices[0].text  # greedy: the same text both ways
        code, _ = server.interrupt()
        assert code == 0
    finally:
        server.kill()
