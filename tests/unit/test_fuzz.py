"""Hostile input, generated: 1,100 requests over HTTP (every generating route, raw bytes) and gRPC
(both methods) against the real engine behind the OpenAI app and the gRPC service (undecodable
gRPC bytes go through Serve's own proxy in tests/integration/test_front_ends.py).
Every answer is a 4xx / INVALID_ARGUMENT (or NOT_FOUND for a model name) or a valid completion,
never a 5xx, INTERNAL or a hang; a stream parses line by line; afterwards the server is healthy,
nothing runs and no KV block is held."""

from __future__ import annotations

import json
import threading
from collections import Counter

import grpc
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from glm_ray.engine.async_engine import AsyncLLMEngine  # noqa: E402
from glm_ray.engine.config import EngineOptions  # noqa: E402
from glm_ray.serving.grpc_service import GenerationService  # noqa: E402
from glm_ray.serving.openai.app import create_app  # noqa: E402
from glm_ray.serving.openai.backend import LocalBackend  # noqa: E402
from glm_ray.v1 import generate_pb2 as pb  # noqa: E402

from uvicorn_server import UvicornServer  # noqa: E402

try:
    import httpx
except ImportError:  # newer environments ship it renamed
    import httpx2 as httpx

MODEL = "glm-tiny"
OPTIONS = dict(dtype="float32", max_model_len=256, max_output_tokens=16, kv_cache_memory=8 << 20)
MAX_BODY = 64 << 10
FUZZ = settings(deadline=None, database=None, derandomize=True, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.data_too_large])

# --- what a hostile client sends -----------------------------------------------------------------

INJECTIONS = st.sampled_from([
    "{{ 7*7 }}", "{% for x in range(10**9) %}x{% endfor %}", "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os.popen('id').read() }}", "<|user|>", "<|assistant|>\n<tool_call>x",
    "</think>", "<tool_call>get<arg_key>a</arg_key><arg_value>", "\u2028\u2029\x85\x00", "\ud800", "a" * 3000,
    "😀" * 50, "\\u0000", "{\"role\": \"system\"}",
])
TEXT = st.text(max_size=40) | INJECTIONS
ANY = st.recursive(
    st.none() | st.booleans() | st.integers(-2**80, 2**80) | st.floats() | TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=10)


def spoiled(valid, names: list[str]):
    """A valid body, or one with one to three of its fields (or unknown ones) replaced by anything:
    half the requests can generate, and every field is attacked on its own as well as together."""
    hostile = st.one_of(
        st.just({}), st.just({}),
        st.dictionaries(st.sampled_from(names + ["unknown_field", "__proto__", "model"]), ANY, min_size=1, max_size=3))
    return st.builds(lambda body, bad: {**body, **bad}, valid, hostile)


TOKEN_IDS = st.lists(st.integers(0, 1000), min_size=1, max_size=24)
VALID_SAMPLING = dict(
    temperature=st.floats(0, 2), top_p=st.floats(0.05, 1), top_k=st.integers(-1, 50), min_p=st.floats(0, 1),
    seed=st.integers(-2**63, 2**63 - 1), stop=TEXT | st.lists(TEXT, max_size=3), logprobs=st.integers(0, 5),
    presence_penalty=st.floats(-2, 2), frequency_penalty=st.floats(-2, 2), repetition_penalty=st.floats(0.5, 2),
    min_tokens=st.integers(0, 8), stop_token_ids=st.lists(st.integers(0, 1000), max_size=3),
    ignore_eos=st.booleans(), stream=st.booleans(), stream_options=st.just({"include_usage": True}))
COMPLETION = spoiled(st.fixed_dictionaries(
    {"model": st.just(MODEL), "prompt": TEXT.filter(bool) | TOKEN_IDS | st.lists(TEXT.filter(bool), min_size=1,
                                                                                  max_size=3),
     "max_tokens": st.integers(1, 16)},
    optional={"echo": st.booleans(), "n": st.integers(1, 2), "prompt_logprobs": st.integers(0, 3),
              "return_token_ids": st.booleans(), **VALID_SAMPLING}),
    ["prompt", "max_tokens", "echo", "n", "prompt_logprobs", "suffix", *VALID_SAMPLING])
MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "user", "assistant"]),
     "content": TEXT | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": TEXT}), min_size=1,
                                max_size=2)})
TOOL = st.fixed_dictionaries({"type": st.just("function"), "function": st.fixed_dictionaries(
    {"name": st.from_regex(r"[a-z_]{1,12}", fullmatch=True)},
    optional={"description": TEXT, "parameters": st.just({"type": "object", "properties": {}}) | ANY})})
CHAT = spoiled(st.fixed_dictionaries(
    {"model": st.just(MODEL), "messages": st.lists(MESSAGE, min_size=1, max_size=4),
     "max_completion_tokens": st.integers(1, 16)},
    optional={"tools": st.lists(TOOL, max_size=2), "tool_choice": st.sampled_from(["auto", "none"]),
              "top_logprobs": st.integers(0, 5),
              "chat_template_kwargs": st.fixed_dictionaries({}, optional={"enable_thinking": st.booleans()}),
              **{k: v for k, v in VALID_SAMPLING.items() if k != "logprobs"}}),
    ["messages", "max_completion_tokens", "tools", "tool_choice", "top_logprobs", "response_format",
     "chat_template_kwargs", "logprobs", *VALID_SAMPLING])
GENERATE = spoiled(st.fixed_dictionaries({"prompt_token_ids": TOKEN_IDS, "max_tokens": st.integers(1, 16)},
                                         optional=VALID_SAMPLING),
                   ["prompt_token_ids", "max_tokens", *VALID_SAMPLING])
JSON_BODY = st.one_of(st.tuples(st.just("/v1/completions"), COMPLETION), st.tuples(st.just("/v1/chat/completions"), CHAT),
                      st.tuples(st.just("/v1/generate"), GENERATE),
                      st.tuples(st.sampled_from(["/v1/completions", "/v1/chat/completions", "/v1/generate"]), ANY))
ROUTES = ["/v1/completions", "/v1/chat/completions", "/v1/generate"]
RAW_BODY = st.one_of(
    st.binary(max_size=300),  # invalid JSON, invalid UTF-8
    st.integers(1, 50_000).map(lambda n: b"[" * n + b"]" * n),  # deep nesting
    st.integers(1, 2000).map(lambda n: b'{"prompt": ' * n + b'"x"' + b"}" * n),
    st.just(b'{"prompt": "' + b"x" * (MAX_BODY + 10) + b'"}'),  # over the body limit
    st.just(b'{"prompt": "\xff\xfe", "max_tokens": 2}'),
)


# --- the servers ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    """One engine behind both front ends: what leaks from either shows in its blocks."""
    engine = AsyncLLMEngine(tiny_model_dir, EngineOptions(**OPTIONS))
    try:
        yield engine
    finally:
        engine.shutdown()


@pytest.fixture(scope="module")
def http(engine):
    server = UvicornServer(create_app(LocalBackend(engine, MODEL), max_body_bytes=MAX_BODY))
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client
    server.stop()


@pytest.fixture(scope="module")
def stub(engine):
    """The service as the gRPC tests serve it: a GrpcError's code, anything else UNKNOWN."""
    from test_grpc_service import _GrpcServer

    server = _GrpcServer(GenerationService(LocalBackend(engine, MODEL)))
    yield server.channel
    server.stop()


SEEN: Counter = Counter()  # (protocol, status) of every answer: the fuzz must reach generation too


def check_http(r: httpx.Response) -> None:
    SEEN["http", r.status_code] += 1
    assert r.status_code < 500, (r.status_code, r.text[:500])
    if r.status_code != 200:
        assert 400 <= r.status_code < 500 and "error" in r.json(), r.text[:500]
        return
    if r.headers.get("content-type", "").startswith("text/event-stream"):
        for line in r.text.split("\n"):  # a reader splitting on "\n" alone must see whole JSON lines
            if line.startswith("data: ") and line != "data: [DONE]":
                event = json.loads(line[6:])
                assert "error" not in event, event
    elif r.headers.get("content-type", "").startswith("application/x-ndjson"):
        for line in r.text.split("\n"):
            if line:
                assert "error" not in json.loads(line), line
    else:
        assert "error" not in r.json()


def assert_idle(engine, http=None):
    if http is not None:
        assert http.get("/health").status_code == 200
    for _ in range(200):
        if engine.num_running() == 0:
            break
        threading.Event().wait(0.05)
    core = engine.engine
    assert engine.num_running() == 0 and not core.has_unfinished()
    assert core.scheduler.block_manager.num_used_blocks == 0  # no KV block leaked


# --- HTTP ----------------------------------------------------------------------------------------

@settings(FUZZ, max_examples=500)
@given(route_body=JSON_BODY)
def test_json_requests_over_http(http, route_body):
    route, body = route_body
    try:
        content = json.dumps(body).encode()
    except (ValueError, OverflowError):
        return
    check_http(http.post(route, content=content, headers={"content-type": "application/json"}))


@settings(FUZZ, max_examples=250)
@given(route=st.sampled_from(ROUTES), body=RAW_BODY, content_type=st.sampled_from(
    ["application/json", "text/plain", "application/json; charset=latin-1", ""]))
def test_raw_bytes_over_http(http, route, body, content_type):
    check_http(http.post(route, content=body, headers={"content-type": content_type} if content_type else {}))


def test_the_http_server_is_healthy_and_idle_after_the_fuzz(http, engine):
    check_http(http.post("/v1/completions", json={"prompt": "hello", "max_tokens": 4}))
    assert_idle(engine, http)
    answers = sum(n for (proto, _), n in SEEN.items() if proto == "http")
    assert answers >= 750 and SEEN["http", 200] >= 0.05 * answers, SEEN  # completions were generated too


# --- gRPC ----------------------------------------------------------------------------------------

I64 = st.integers(-2**63, 2**63 - 1)
PROTO_TEXT = TEXT.filter(lambda s: "\ud800" not in s)  # a proto string is valid UTF-8 by construction
GRPC_VALID = dict(temperature=st.floats(0, 2), top_p=st.floats(0.05, 1), top_k=st.integers(-1, 50),
                  min_p=st.floats(0, 1), seed=I64, max_tokens=st.integers(1, 16), min_tokens=st.integers(0, 8),
                  stop=st.lists(PROTO_TEXT, max_size=3), stop_token_ids=st.lists(st.integers(0, 1000), max_size=3),
                  ignore_eos=st.booleans(), logprobs=st.integers(0, 5), repetition_penalty=st.floats(0.5, 2))
GRPC_HOSTILE = dict(temperature=st.floats(), top_p=st.floats(), top_k=I64, min_p=st.floats(), seed=I64,
                    max_tokens=I64, min_tokens=I64, stop=st.lists(PROTO_TEXT, max_size=50),
                    stop_token_ids=st.lists(I64, max_size=5), logprobs=I64, repetition_penalty=st.floats(),
                    presence_penalty=st.floats(), frequency_penalty=st.floats())
GRPC_SAMPLING = st.builds(
    lambda valid, bad: pb.SamplingOptions(**{**valid, **bad}),
    st.fixed_dictionaries({}, optional=GRPC_VALID),
    st.one_of(st.just({}), st.just({}), st.sampled_from(sorted(GRPC_HOSTILE)).flatmap(
        lambda name: st.fixed_dictionaries({name: GRPC_HOSTILE[name]}))))
GRPC_GENERATE = st.one_of(
    st.builds(pb.GenerateRequest, model=st.just("") | st.just(MODEL) | PROTO_TEXT, prompt=PROTO_TEXT,
              sampling=GRPC_SAMPLING, request_id=PROTO_TEXT),
    st.builds(pb.GenerateRequest, prompt_token_ids=st.builds(
        pb.TokenIds, ids=TOKEN_IDS | st.lists(I64, max_size=20)), sampling=GRPC_SAMPLING))
GRPC_MESSAGE = st.builds(pb.ChatMessage, role=st.sampled_from(["system", "user", "user", "assistant", "tool", "x"]),
                         content=PROTO_TEXT, tool_call_id=st.just("") | PROTO_TEXT,
                         tool_calls=st.lists(st.builds(pb.ToolCall, id=PROTO_TEXT, name=PROTO_TEXT,
                                                       arguments=st.just("{}") | PROTO_TEXT), max_size=1))
GRPC_CHAT = st.builds(pb.ChatRequest, messages=st.lists(GRPC_MESSAGE, min_size=1, max_size=4), sampling=GRPC_SAMPLING,
                      tools=st.lists(st.builds(pb.Tool, name=st.from_regex(r"[a-z_]{1,12}", fullmatch=True) | PROTO_TEXT,
                                               description=PROTO_TEXT,
                                               parameters=st.just('{"type": "object"}') | PROTO_TEXT), max_size=2))
ACCEPTED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND}


def call_grpc(channel, method: str, payload: bytes) -> None:
    call = channel.unary_stream(f"/glm_ray.v1.Generation/{method}")  # bytes in, bytes out
    try:
        for _ in call(payload, timeout=60):
            pass
        SEEN["grpc", grpc.StatusCode.OK] += 1
    except grpc.RpcError as e:
        SEEN["grpc", e.code()] += 1
        assert e.code() in ACCEPTED, (e.code(), e.details())


@settings(FUZZ, max_examples=200)
@given(request=GRPC_GENERATE)
def test_generate_requests_over_grpc(stub, request):
    call_grpc(stub, "Generate", request.SerializeToString())


@settings(FUZZ, max_examples=150)
@given(request=GRPC_CHAT)
def test_chat_requests_over_grpc(stub, request):
    call_grpc(stub, "Chat", request.SerializeToString())


def test_the_grpc_server_is_idle_after_the_fuzz(stub, engine):
    assert_idle(engine)
    answers = sum(n for (proto, _), n in SEEN.items() if proto == "grpc")
    assert answers >= 350 and SEEN["grpc", grpc.StatusCode.OK] >= 0.05 * answers, SEEN
