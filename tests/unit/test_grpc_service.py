"""The gRPC `Generation` service on a real grpc.aio server (127.0.0.1, its own event loop), called
by a client stub built from the project's protos: the tiny model through `LocalBackend` (greedy
output must equal `LLM`'s) and `FakeBackend` for tool calls, reasoning, failures and overload."""

from __future__ import annotations

import asyncio
import json
import threading

import grpc
import pytest

from glm_ray.engine.async_engine import AsyncLLMEngine
from glm_ray.engine.config import EngineOptions
from glm_ray.engine.sampling_params import SamplingParams
from glm_ray.llm import LLM
from glm_ray.serving.grpc_service import GenerationService, GrpcError
from glm_ray.serving.openai.backend import LocalBackend
from glm_ray.serving.admission import Admission
from glm_ray.tokenizer import Tokenizer
from glm_ray.v1 import generate_pb2 as pb
from glm_ray.v1 import generate_pb2_grpc as pb_grpc

from fake_backend import GLM_OUTPUT, TOOLS, WEATHER_ARGS, FakeBackend, pieces

OPTIONS = dict(dtype="float32", max_model_len=256, max_output_tokens=128)
MODEL = "glm-tiny"


class _Servicer(pb_grpc.GenerationServicer):
    def __init__(self, service: GenerationService):
        self.service = service

    async def Generate(self, request, context):  # noqa: N802
        try:
            async for message in self.service.generate(request):
                yield message
        except GrpcError as e:
            await context.abort(e.code, e.details)

    async def Chat(self, request, context):  # noqa: N802
        try:
            async for message in self.service.chat(request):
                yield message
        except GrpcError as e:
            await context.abort(e.code, e.details)


class _GrpcServer:
    def __init__(self, service: GenerationService):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server, port = asyncio.run_coroutine_threadsafe(self._start(service), self.loop).result(30)
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.stub = pb_grpc.GenerationStub(self.channel)

    async def _start(self, service):
        server = grpc.aio.server()
        pb_grpc.add_GenerationServicer_to_server(_Servicer(service), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    def stop(self):
        self.channel.close()
        asyncio.run_coroutine_threadsafe(self.server.stop(0), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)


@pytest.fixture(scope="module")
def local(tiny_model_dir):
    engine = AsyncLLMEngine(tiny_model_dir, EngineOptions(**OPTIONS))
    server = _GrpcServer(GenerationService(LocalBackend(engine, MODEL)))
    yield server.stub
    server.stop()
    engine.shutdown()


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    return LLM(tiny_model_dir, **OPTIONS)


@pytest.fixture(scope="module")
def fake_server(tiny_model_dir):
    backend = FakeBackend(Tokenizer.from_pretrained(tiny_model_dir))
    server = _GrpcServer(GenerationService(backend, admission=Admission(1)))
    server.backend = backend
    yield server
    server.stop()


@pytest.fixture
def fake(fake_server):
    b = fake_server.backend
    b.script, b.finish_reason, b.fail, b.gate = ["hello"], "stop", None, None
    b.entered.clear()
    return fake_server.stub, b


def test_generate_streams_what_llm_generates(local, reference):
    sampling = pb.SamplingOptions(temperature=0, max_tokens=9, ignore_eos=True, logprobs=2)
    replies = list(local.Generate(pb.GenerateRequest(prompt="Hello world", sampling=sampling, request_id="r1")))
    want = reference.generate("Hello world", SamplingParams(temperature=0, max_tokens=9, ignore_eos=True,
                                                            logprobs=2))[0].outputs[0]
    assert [t for r in replies for t in r.token_ids] == list(want.token_ids)
    assert "".join(r.text for r in replies) == want.text
    assert all(r.request_id == "r1" for r in replies)
    assert [r.finish_reason for r in replies][-1] == "length" and not any(r.finish_reason for r in replies[:-1])
    last = replies[-1]
    assert (last.usage.completion_tokens, last.usage.total_tokens - last.usage.prompt_tokens) == (9, 9)
    logprobs = [lp for r in replies for lp in r.logprobs]
    assert [lp.token_id for lp in logprobs] == list(want.token_ids)
    for lp, entry in zip(logprobs, want.logprobs):
        assert lp.logprob == pytest.approx(entry[lp.token_id].logprob, abs=1e-5)
        assert 1 <= len(lp.top_logprobs) <= 2 and all(t.token_id != lp.token_id for t in lp.top_logprobs)


def test_generate_from_token_ids_and_chat_match_llm(local, reference):
    ids = [5, 17, 300, 42]
    sampling = pb.SamplingOptions(temperature=0, max_tokens=6, ignore_eos=True)
    got = [t for r in local.Generate(pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=ids), sampling=sampling))
           for t in r.token_ids]
    want = reference.generate({"prompt_token_ids": ids}, SamplingParams(temperature=0, max_tokens=6,
                                                                        ignore_eos=True))[0]
    assert got == list(want.outputs[0].token_ids)

    chat = pb.ChatRequest(messages=[pb.ChatMessage(role="system", content="Be brief."),
                                    pb.ChatMessage(role="user", content="What is the weather?")],
                          sampling=sampling, enable_thinking=False)
    replies = list(local.Chat(chat))
    want = reference.chat([{"role": "system", "content": "Be brief."},
                           {"role": "user", "content": "What is the weather?"}],
                          SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
                          chat_template_kwargs={"enable_thinking": False})[0]
    assert "".join(r.content for r in replies) == want.outputs[0].text
    assert replies[-1].finish_reason == "length"
    assert replies[-1].usage.prompt_tokens == len(want.prompt_token_ids) and replies[-1].usage.completion_tokens == 6


@pytest.mark.parametrize("size", [1, 50])
def test_chat_streams_reasoning_and_typed_tool_calls(fake, size):
    stub, backend = fake
    backend.script = pieces(GLM_OUTPUT, size)
    tools = [pb.Tool(name=t["function"]["name"], description=t["function"].get("description", ""),
                     parameters=json.dumps(t["function"]["parameters"])) for t in TOOLS]
    request = pb.ChatRequest(model="fake", messages=[pb.ChatMessage(role="user", content="Weather?")], tools=tools)
    replies = list(stub.Chat(request))
    assert "".join(r.reasoning_content for r in replies) == "The user wants weather."
    assert "".join(r.content for r in replies) == "Let me check."
    assert all("<" not in r.content for r in replies)  # never a partial tag
    names, args = {}, {}
    for r in replies:
        for call in r.tool_calls:
            if call.name:
                assert call.index not in names and call.id, "the name and id come once, first"
                names[call.index] = call.name
            args[call.index] = args.get(call.index, "") + call.arguments
    assert names == {0: "get_weather", 1: "get_time"}
    assert json.loads(args[0]) == WEATHER_ARGS and json.loads(args[1]) == {"zone": "0800"}  # "0800" stays a string
    assert replies[-1].finish_reason == "tool_calls"
    assert replies[-1].usage.completion_tokens == len(backend.script)

    one = list(stub.Chat(pb.ChatRequest(model="fake", messages=request.messages, tools=tools,
                                        parallel_tool_calls=False, tool_choice="get_time")))
    assert {c.name for r in one for c in r.tool_calls if c.name} == {"get_weather"}
    none = list(stub.Chat(pb.ChatRequest(model="fake", messages=request.messages, tools=tools, tool_choice="none")))
    assert none[-1].finish_reason == "stop" and not any(r.tool_calls for r in none)


def test_history_with_tool_calls_renders(fake):
    stub, backend = fake
    messages = [pb.ChatMessage(role="user", content="Weather in Paris?"),
                pb.ChatMessage(role="assistant", tool_calls=[pb.ToolCall(id="c1", name="get_weather",
                                                                         arguments='{"city": "Paris"}')]),
                pb.ChatMessage(role="tool", tool_call_id="c1", content="sunny")]
    replies = list(stub.Chat(pb.ChatRequest(model="fake", messages=messages, enable_thinking=False)))
    assert "".join(r.content for r in replies) == "hello"
    prompt = backend.requests[-1]["prompt"]
    assert "<arg_value>Paris</arg_value>" in prompt and "sunny" in prompt


def _status(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        list(call())
    return info.value.code(), info.value.details()


@pytest.mark.parametrize("request_, code, named", [
    (pb.GenerateRequest(model="fake", prompt="hi", sampling=pb.SamplingOptions(temperature=-1)),
     grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
    (pb.GenerateRequest(model="fake", prompt="hi", sampling=pb.SamplingOptions(max_tokens=0)),
     grpc.StatusCode.INVALID_ARGUMENT, "max_tokens"),
    (pb.GenerateRequest(model="fake", prompt="hi", sampling=pb.SamplingOptions(max_tokens=5000)),
     grpc.StatusCode.INVALID_ARGUMENT, "max_tokens"),
    (pb.GenerateRequest(model="fake", prompt="hi", sampling=pb.SamplingOptions(top_p=1.5)),
     grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
    (pb.GenerateRequest(model="fake"), grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
    (pb.GenerateRequest(model="fake", prompt_token_ids=pb.TokenIds()), grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
    (pb.GenerateRequest(model="nope", prompt="hi"), grpc.StatusCode.NOT_FOUND, "nope"),
    (pb.ChatRequest(model="fake"), grpc.StatusCode.INVALID_ARGUMENT, "messages"),
    (pb.ChatRequest(model="fake", messages=[pb.ChatMessage(role="robot", content="x")]),
     grpc.StatusCode.INVALID_ARGUMENT, "role"),
    (pb.ChatRequest(model="fake", messages=[pb.ChatMessage(role="user", content="x")],
                    tools=[pb.Tool(name="f", parameters="{not json")]), grpc.StatusCode.INVALID_ARGUMENT,
     "tools[0].parameters"),
    (pb.ChatRequest(model="fake", messages=[pb.ChatMessage(role="user", content="x")],
                    chat_template_kwargs="[1]"), grpc.StatusCode.INVALID_ARGUMENT, "chat_template_kwargs"),
])
def test_bad_requests_name_the_field_then_a_good_one_works(fake, request_, code, named):
    stub, _ = fake
    method = stub.Generate if isinstance(request_, pb.GenerateRequest) else stub.Chat
    got_code, details = _status(lambda: method(request_))
    assert got_code == code and named in details
    assert "".join(r.text for r in stub.Generate(pb.GenerateRequest(model="fake", prompt="hi"))) == "hello"


def test_backend_failure_is_unavailable(fake):
    stub, backend = fake
    backend.fail = RuntimeError("expert group 1 has no live replica")
    code, details = _status(lambda: stub.Generate(pb.GenerateRequest(prompt="hi")))
    assert code == grpc.StatusCode.UNAVAILABLE and "no live replica" in details


def test_overload_is_resource_exhausted(fake):
    stub, backend = fake
    backend.gate = threading.Event()
    held = stub.Generate(pb.GenerateRequest(prompt="hi"))  # admitted, blocks inside the backend
    first = threading.Thread(target=lambda: list(held))
    first.start()
    assert backend.entered.wait(10)
    code, details = _status(lambda: stub.Generate(pb.GenerateRequest(prompt="hi")))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "limit of 1" in details
    backend.gate.set()
    first.join(10)
    assert "".join(r.text for r in stub.Generate(pb.GenerateRequest(prompt="hi"))) == "hello"


def test_a_request_over_the_time_limit_is_deadline_exceeded():
    from glm_ray.serving.grpc_service import GrpcError
    from glm_ray.serving.timeout import RequestTimeout

    err = GrpcError.of(RequestTimeout(2.0))
    assert err.code == grpc.StatusCode.DEADLINE_EXCEEDED and "request_timeout_s (2 s)" in err.details
