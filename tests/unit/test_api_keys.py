"""Client API keys on both front ends, over real sockets: the OpenAI app under uvicorn (the official
`openai` client and raw httpx) and the gRPC `Generation` service on a grpc.aio server. With keys
set, every route but /health needs one; without keys nothing changes."""

from __future__ import annotations

import asyncio
import threading

import grpc
import openai
import pytest

from glm_ray.serving.api_keys import ApiKeys, keys_from_env
from glm_ray.serving.grpc_service import GenerationService, GrpcError
from glm_ray.serving.openai.app import create_app
from glm_ray.tokenizer import Tokenizer
from glm_ray.v1 import generate_pb2 as pb
from glm_ray.v1 import generate_pb2_grpc as pb_grpc

from fake_backend import FakeBackend
from uvicorn_server import UvicornServer

try:
    import httpx
except ImportError:  # newer environments ship it renamed
    import httpx2 as httpx

KEYS = ["key-one-0123456789", "key-two-9876543210"]


def test_keys_parse_and_compare():
    keys = ApiKeys(KEYS)
    assert keys.enabled and "key-one" not in repr(keys)
    assert keys.problem(f"Bearer {KEYS[0]}") is None
    assert keys.problem(f"bearer  {KEYS[1]} ") is None  # scheme case-insensitive, spaces trimmed
    assert "requires an API key" in keys.problem(None)
    assert "Bearer <key>" in keys.problem(KEYS[0])  # the scheme is required
    assert keys.problem(f"Bearer {KEYS[0]}x") == "incorrect API key provided"
    assert keys.problem("Bearer ") is not None
    assert ApiKeys().problem(None) is None  # off: everything passes
    assert keys_from_env({"GLM_RAY_API_KEY": " a, b ,,"}) == ["a", "b"]
    assert keys_from_env({}) == []


@pytest.fixture(scope="module")
def backend(tiny_model_dir):
    return FakeBackend(Tokenizer.from_pretrained(tiny_model_dir))


@pytest.fixture(scope="module")
def http(backend):
    server = UvicornServer(create_app(backend, api_keys=ApiKeys(KEYS)))
    yield server
    server.stop()


@pytest.mark.parametrize("path", ["/v1/models", "/metrics", "/v1/experts"])
def test_http_routes_need_a_key(http, path):
    for headers in ({}, {"Authorization": "Bearer wrong-key"}, {"Authorization": KEYS[0]}):
        r = httpx.get(http.url + path, headers=headers)
        assert r.status_code == 401, (path, headers)
        error = r.json()["error"]
        assert error["type"] == "invalid_request_error" and error["code"] == 401 and error["message"]
        assert r.headers["www-authenticate"] == "Bearer"
        assert "r0" not in r.text  # /v1/experts' replica addresses are not shown
    for key in KEYS:
        r = httpx.get(http.url + path, headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 200, path
    assert "r0" in httpx.get(http.url + "/v1/experts", headers={"Authorization": f"Bearer {KEYS[0]}"}).text


def test_http_health_stays_open(http):
    r = httpx.get(http.url + "/health")
    assert r.status_code == 200 and r.json()["status"] == "ok"


def test_openai_client_with_and_without_key(http, backend):
    backend.script = ["hello", " world"]
    before = len(backend.requests)
    bad = openai.OpenAI(base_url=http.url + "/v1", api_key="not-a-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.completions.create(model="fake", prompt="hi", max_tokens=4)
    assert "incorrect API key" in str(e.value)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model="fake", messages=[{"role": "user", "content": "hi"}])
    assert len(backend.requests) == before  # refused before reaching the model
    good = openai.OpenAI(base_url=http.url + "/v1", api_key=KEYS[1], max_retries=0)
    out = good.completions.create(model="fake", prompt="hi", max_tokens=4)
    assert out.choices[0].text == "hello world"
    stream = good.chat.completions.create(model="fake", messages=[{"role": "user", "content": "hi"}], stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "hello world"


def test_http_without_keys_is_open(backend):
    server = UvicornServer(create_app(backend))
    try:
        assert httpx.get(server.url + "/v1/models").status_code == 200
        assert httpx.get(server.url + "/v1/experts").status_code == 200
    finally:
        server.stop()


class _Servicer(pb_grpc.GenerationServicer):
    """What the Serve ingress does: the call's `authorization` metadata goes to the service."""

    def __init__(self, service: GenerationService):
        self.service = service

    async def Generate(self, request, context):  # noqa: N802
        authorization = dict(context.invocation_metadata()).get("authorization")
        try:
            async for message in self.service.generate(request, authorization):
                yield message
        except GrpcError as e:
            await context.abort(e.code, e.details)


@pytest.fixture(scope="module")
def grpc_stub(backend):
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def start():
        server = grpc.aio.server()
        pb_grpc.add_GenerationServicer_to_server(_Servicer(GenerationService(backend, api_keys=ApiKeys(KEYS))),
                                                 server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    server, port = asyncio.run_coroutine_threadsafe(start(), loop).result(30)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield pb_grpc.GenerationStub(channel)
    channel.close()
    asyncio.run_coroutine_threadsafe(server.stop(0), loop).result(30)
    loop.call_soon_threadsafe(loop.stop)


def test_grpc_needs_a_key(grpc_stub, backend):
    backend.script = ["hello"]
    request = pb.GenerateRequest(prompt="hi", sampling=pb.SamplingOptions(max_tokens=4))
    before = len(backend.requests)
    for metadata in ((), (("authorization", "Bearer nope"),), (("authorization", KEYS[0]),)):
        with pytest.raises(grpc.RpcError) as e:
            list(grpc_stub.Generate(request, metadata=metadata))
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED, metadata
        assert KEYS[0] not in e.value.details()
    assert len(backend.requests) == before
    replies = list(grpc_stub.Generate(request, metadata=(("authorization", f"Bearer {KEYS[0]}"),)))
    assert "".join(r.text for r in replies) == "hello"
