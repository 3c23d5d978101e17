"""The public APIs of the disaggregated app on a local Ray cluster: OpenAI-compatible HTTP with the
official `openai` client and raw requests, and gRPC through Serve's proxy with a stub built from
the project's protos. Every error is followed by a request that still succeeds. The app runs with
an API key and a fixed cluster secret: requests without the key, and dispatch calls without the
secret, are refused."""

import json
import os
import subprocess
import sys
import threading
import time

import grpc
import pytest
import requests

from glm_ray import LLM, SamplingParams
from glm_ray.serving.config import ServeConfig
from glm_ray.v1 import generate_pb2 as pb
from glm_ray.v1 import generate_pb2_grpc as pb_grpc

from .test_serving import deploy, undeploy

openai = pytest.importorskip("openai")

MAX_PENDING = 2  # small, so overload is easy to reach: the tests below send one request at a time
MAX_BODY = 1 << 20
API_KEY = "front-ends-test-key-0123"
CLUSTER_SECRET = "front-ends-cluster-secret-0123456789"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
# Serve's gRPC proxy routes by application name; the key goes as `authorization` metadata
METADATA = (("application", "glm-ray"), ("authorization", f"Bearer {API_KEY}"))


@pytest.fixture(scope="module")
def server(ray_serve, tiny_model_dir):
    deploy(ServeConfig(model=str(tiny_model_dir), served_model_name="glm-tiny", expert_groups=2, dtype="float32",
                       kv_cache_memory=32 << 20, max_model_len=4096, max_pending_requests=MAX_PENDING,
                       max_body_bytes=MAX_BODY, api_keys=[API_KEY], cluster_secret=CLUSTER_SECRET), ray_serve)
    yield ray_serve
    undeploy()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0)


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return LLM(tiny_model_dir, dtype="float32")


def test_models_and_completion_match_the_engine(client, llm):
    assert [m.id for m in client.models.list().data] == ["glm-tiny"]
    r = client.completions.create(model="glm-tiny", prompt="Hello world", max_tokens=10, temperature=0,
                                  extra_body={"ignore_eos": True})
    want = llm.generate("Hello world", SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))[0]
    assert r.choices[0].text == want.outputs[0].text
    assert r.usage.prompt_tokens == len(want.prompt_token_ids) and r.usage.completion_tokens == 10


def test_streaming_chat_with_usage(client, llm):
    messages = [{"role": "user", "content": "What is the weather?"}]
    stream = client.chat.completions.create(model="glm-tiny", messages=messages, max_completion_tokens=12,
                                            temperature=0, stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True,
                                                        "chat_template_kwargs": {"enable_thinking": False}})
    content, usage = "", None
    for chunk in stream:
        if chunk.choices:
            content += chunk.choices[0].delta.content or ""
        if chunk.usage:
            usage = chunk.usage
    want = llm.chat(messages, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
                    chat_template_kwargs={"enable_thinking": False})[0]
    assert content == want.outputs[0].text
    assert usage.completion_tokens == 12 and usage.prompt_tokens == len(want.prompt_token_ids)


def test_chat_whole_and_streamed_completion_with_logprobs(client, llm):
    """Non-streamed chat and streamed completion, both with logprobs equal to the engine's."""
    messages = [{"role": "user", "content": "Tell me a story"}]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=2)
    want = llm.chat(messages, params, chat_template_kwargs={"enable_thinking": False})[0].outputs[0]
    r = client.chat.completions.create(model="glm-tiny", messages=messages, max_completion_tokens=8, temperature=0,
                                       logprobs=True, top_logprobs=2,
                                       extra_body={"ignore_eos": True,
                                                   "chat_template_kwargs": {"enable_thinking": False}})
    choice = r.choices[0]
    assert choice.message.content == want.text and choice.finish_reason == "length"
    assert r.usage.completion_tokens == 8
    got = [e.logprob for e in choice.logprobs.content]
    assert got == pytest.approx([lp[t].logprob for t, lp in zip(want.token_ids, want.logprobs)], abs=1e-4)
    assert all(len(e.top_logprobs) == 2 for e in choice.logprobs.content)

    want = llm.generate("Once upon", params)[0].outputs[0]
    text, logprobs, usage = "", [], None
    for chunk in client.completions.create(model="glm-tiny", prompt="Once upon", max_tokens=8, temperature=0,
                                           logprobs=2, stream=True, stream_options={"include_usage": True},
                                           extra_body={"ignore_eos": True}):
        if chunk.choices:
            text += chunk.choices[0].text
            if chunk.choices[0].logprobs:
                logprobs += chunk.choices[0].logprobs.token_logprobs
        usage = chunk.usage or usage
    assert text == want.text and usage.completion_tokens == 8
    assert logprobs == pytest.approx([lp[t].logprob for t, lp in zip(want.token_ids, want.logprobs)], abs=1e-4)


@pytest.mark.parametrize("body, status", [
    ({"model": "glm-tiny", "prompt": "hi", "temperature": -1}, 400),
    ({"model": "glm-tiny", "prompt": "hi", "max_tokens": 0}, 400),
    ({"model": "glm-tiny", "prompt": "hi", "max_tokens": 5000}, 400),
    ({"model": "nope", "prompt": "hi"}, 404),
])
def test_errors_then_a_good_request(server, client, body, status):
    r = requests.post(f"{server}/v1/completions", json=body, headers=AUTH, timeout=60)
    assert r.status_code == status
    err = r.json()["error"]
    assert err["message"] and err["type"] and err["code"] == status
    ok = client.completions.create(model="glm-tiny", prompt="hi", max_tokens=2, temperature=0)
    assert ok.choices[0].finish_reason in ("length", "stop")


def _experts_after_traffic(server, client) -> dict:
    """/v1/experts once the router's window holds this request's routing. Attention replicas report
    routing on a timer and the window drops what is older than a minute, so whether earlier tests'
    traffic still counts depended on how long they took (a fresh-clone CI run once saw no layers)."""
    client.completions.create(model="glm-tiny", prompt="balance me", max_tokens=4, temperature=0)
    deadline = time.monotonic() + 60
    while True:
        experts = requests.get(f"{server}/v1/experts", headers=AUTH, timeout=30).json()
        if experts["balancedness"]["layers"] or time.monotonic() > deadline:
            return experts
        time.sleep(0.5)


def test_health_metrics_experts(server, client):
    assert requests.get(f"{server}/health", timeout=30).status_code == 200
    experts = _experts_after_traffic(server, client)
    assert experts["placement"]["groups"] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert all(len(a) == 1 for a in experts["replicas"].values())
    metrics = requests.get(f"{server}/metrics", headers=AUTH, timeout=30).text
    for line in ['glm_ray_deployment_replicas{deployment="ExpertGroup_0",state="running"} 1.0',
                 'glm_ray_deployment_replicas{deployment="AttentionReplica",state="running"} 1.0',
                 'glm_ray_expert_group_busy_fraction{group="1"}', 'glm_ray_expert_group_tokens_per_second{group="0"}',
                 "glm_ray_attention_sequences{replica=", "glm_ray_attention_kv_cache_usage_ratio{replica=",
                 'glm_ray_expert_balancedness{layer="', 'glm_ray_expert_balancedness_summary{stat="min"}']:
        assert line in metrics
    # balancedness of each layer: mean / max of the tokens its groups computed over the window
    balance, groups = experts["balancedness"], experts["placement"]["groups"]
    assert balance["layers"] and set(balance["layers"]) <= set(experts["tokens_per_expert"])
    for layer, b in balance["layers"].items():
        per_group = [sum(experts["tokens_per_expert"][layer][e] for e in members) for members in groups]
        assert b == pytest.approx(sum(per_group) / len(per_group) / max(per_group))
        assert 1 / len(groups) <= b <= 1.0
    assert balance["min"] == pytest.approx(min(balance["layers"].values()))


def test_without_the_api_key_only_health_answers(server, grpc_stub):
    health = requests.get(f"{server}/health", timeout=30)
    assert health.status_code == 200 and health.json()["replicas"] == {"0": 1, "1": 1}  # counts, no addresses
    experts = requests.get(f"{server}/v1/experts", headers=AUTH, timeout=30).json()
    addresses = [a for group in experts["replicas"].values() for a in group]
    for headers in ({}, {"Authorization": "Bearer not-the-key"}):
        for method, path in [("get", "/v1/models"), ("get", "/v1/experts"), ("get", "/metrics"),
                             ("post", "/v1/completions"), ("post", "/v1/chat/completions"), ("post", "/v1/generate")]:
            r = requests.request(method, f"{server}{path}", json={"model": "glm-tiny", "prompt": "hi"},
                                 headers=headers, timeout=30)
            assert r.status_code == 401, (path, headers)
            assert r.json()["error"]["type"] == "invalid_request_error" and "API key" in r.json()["error"]["message"]
            assert not any(a in r.text for a in addresses)  # expert addresses are not served
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server}/v1", api_key="not-the-key", max_retries=0).completions.create(
            model="glm-tiny", prompt="hi", max_tokens=2)
    for metadata in [(("application", "glm-ray"),), (("application", "glm-ray"), ("authorization", "Bearer no"))]:
        with pytest.raises(grpc.RpcError) as info:
            list(grpc_stub.Generate(pb.GenerateRequest(prompt="hi"), metadata=metadata))
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    for path in ["/health", "/v1/experts", "/metrics"]:  # the cluster secret is nowhere to be read
        assert CLUSTER_SECRET not in requests.get(f"{server}{path}", headers=AUTH, timeout=30).text


def test_expert_replicas_refuse_dispatch_without_the_cluster_secret(server):
    """An expert replica's port, read from /v1/experts, answers nothing and computes nothing for a
    caller without the cluster secret."""
    from glm_ray.experts.auth import SECRET_METADATA_KEY
    from glm_ray.v1 import experts_pb2 as epb
    from glm_ray.v1 import experts_pb2_grpc as epb_grpc

    address = requests.get(f"{server}/v1/experts", headers=AUTH, timeout=30).json()["replicas"]["0"][0]
    with grpc.insecure_channel(address) as channel:
        stub = epb_grpc.ExpertServiceStub(channel)
        ok = ((SECRET_METADATA_KEY, CLUSTER_SECRET),)
        calls = stub.Ping(epb.PingRequest(), metadata=ok, timeout=10).num_calls
        request = epb.ForwardRequest(layer=1, request_id=1)
        for metadata in [(), ((SECRET_METADATA_KEY, "wrong-secret-0123456789"),)]:
            for call in (lambda: stub.Forward(request, metadata=metadata, timeout=10),
                         lambda: stub.Ping(epb.PingRequest(), metadata=metadata, timeout=10)):
                with pytest.raises(grpc.RpcError) as info:
                    call()
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert CLUSTER_SECRET not in info.value.details()
        assert stub.Ping(epb.PingRequest(), metadata=ok, timeout=10).num_calls == calls  # nothing was computed


def test_body_over_the_limit_is_413(server, client):
    r = requests.post(f"{server}/v1/completions", data=b'{"model": "glm-tiny", "prompt": "' + b"x" * MAX_BODY + b'"}',
                      headers={"content-type": "application/json", **AUTH}, timeout=60)
    assert r.status_code == 413 and r.json()["error"]["code"] == 413
    assert client.completions.create(model="glm-tiny", prompt="hi", max_tokens=2).choices[0].text is not None


def _hold_streams(server, n):
    """n streaming completions that stay in flight until closed (3000 tokens each)."""
    body = {"model": "glm-tiny", "prompt": "hold", "max_tokens": 3000, "ignore_eos": True, "stream": True}
    held = [requests.post(f"{server}/v1/completions", json=body, stream=True, headers=AUTH, timeout=120)
            for _ in range(n)]
    lines = []  # the line iterators stay referenced: dropping one closes its connection
    for r in held:
        assert r.status_code == 200
        lines.append(r.iter_lines())
        next(lines[-1])  # the first chunk arrived: the request is running
    return held, lines


def test_overload_is_429_over_http_and_resource_exhausted_over_grpc(server, client, grpc_stub):
    held, _lines = _hold_streams(server, MAX_PENDING)
    try:
        r = requests.post(f"{server}/v1/completions", json={"model": "glm-tiny", "prompt": "hi"}, headers=AUTH,
                          timeout=60)
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["type"] == "rate_limit_exceeded"
        with pytest.raises(grpc.RpcError) as info:
            list(grpc_stub.Generate(pb.GenerateRequest(prompt="hi"), metadata=METADATA))
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "limit of 2" in info.value.details()
    finally:
        for h in held:
            h.close()  # the client leaves: the server aborts both requests and frees their places
    ok = None
    for _ in range(50):  # the aborts land within a step or two
        ok = requests.post(f"{server}/v1/completions", json={"model": "glm-tiny", "prompt": "hi", "max_tokens": 2},
                           headers=AUTH, timeout=60)
        if ok.status_code == 200:
            break
        threading.Event().wait(0.2)
    assert ok.status_code == 200


def _wait_engine(attention, want_free: int, timeout_s: float = 15.0) -> dict:
    """The attention replica's engine stats once nothing runs and `want_free` KV blocks are free."""
    deadline = time.monotonic() + timeout_s
    while True:
        stats = attention.engine_stats.remote().result()
        if (stats["running"] == 0 and stats["free_blocks"] == want_free) or time.monotonic() > deadline:
            return stats
        time.sleep(0.1)


def test_a_client_gone_mid_stream_is_aborted_and_its_kv_blocks_return(server, grpc_stub):
    """Over HTTP (the connection closed) and gRPC (the call cancelled), through Serve: the attention
    replica stops generating for the request and its KV-cache blocks are free again."""
    from ray import serve

    attention = serve.get_deployment_handle("AttentionReplica", app_name="glm-ray")
    baseline = _wait_engine(attention, attention.engine_stats.remote().result()["free_blocks"])
    assert baseline["running"] == 0
    held, lines = _hold_streams(server, 1)
    running = attention.engine_stats.remote().result()
    assert running["running"] == 1 and running["free_blocks"] < baseline["free_blocks"]
    held[0].close()
    after = _wait_engine(attention, baseline["free_blocks"])
    assert after["running"] == 0 and after["free_blocks"] == baseline["free_blocks"], (baseline, after)

    call = grpc_stub.Generate(pb.GenerateRequest(prompt="hold", sampling=pb.SamplingOptions(
        max_tokens=3000, ignore_eos=True)), metadata=METADATA)
    next(call)  # the first reply arrived: the request is running
    running = attention.engine_stats.remote().result()
    assert running["running"] == 1 and running["free_blocks"] < baseline["free_blocks"]
    call.cancel()
    after = _wait_engine(attention, baseline["free_blocks"])
    assert after["running"] == 0 and after["free_blocks"] == baseline["free_blocks"], (baseline, after)


@pytest.fixture(scope="module")
def grpc_stub(server, grpc_target):
    channel = grpc.insecure_channel(grpc_target)
    yield pb_grpc.GenerationStub(channel)
    channel.close()


def test_grpc_generate_and_chat_match_the_engine(grpc_stub, llm):
    sampling = pb.SamplingOptions(temperature=0, max_tokens=10, ignore_eos=True)
    replies = list(grpc_stub.Generate(pb.GenerateRequest(model="glm-tiny", prompt="Hello world", sampling=sampling),
                                      metadata=METADATA))
    want = llm.generate("Hello world", SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))[0]
    assert [t for r in replies for t in r.token_ids] == list(want.outputs[0].token_ids)
    assert "".join(r.text for r in replies) == want.outputs[0].text
    assert replies[-1].finish_reason == "length"
    assert (replies[-1].usage.prompt_tokens, replies[-1].usage.completion_tokens) == (len(want.prompt_token_ids), 10)

    messages = [{"role": "user", "content": "What is the weather?"}]
    chat = list(grpc_stub.Chat(pb.ChatRequest(messages=[pb.ChatMessage(**m) for m in messages], sampling=sampling,
                                              enable_thinking=False), metadata=METADATA))
    want = llm.chat(messages, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True),
                    chat_template_kwargs={"enable_thinking": False})[0]
    assert "".join(r.content for r in chat) == want.outputs[0].text
    assert chat[-1].usage.completion_tokens == 10 and chat[-1].usage.prompt_tokens == len(want.prompt_token_ids)


@pytest.mark.parametrize("request_, code, named", [
    (pb.GenerateRequest(prompt="hi", sampling=pb.SamplingOptions(temperature=-1)),
     grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
    (pb.GenerateRequest(prompt="hi", sampling=pb.SamplingOptions(max_tokens=5000)),
     grpc.StatusCode.INVALID_ARGUMENT, "max_tokens"),
    (pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=[10 ** 9])), grpc.StatusCode.INVALID_ARGUMENT, "vocabulary"),
    (pb.GenerateRequest(model="nope", prompt="hi"), grpc.StatusCode.NOT_FOUND, "nope"),
    (pb.ChatRequest(messages=[pb.ChatMessage(role="robot", content="x")]), grpc.StatusCode.INVALID_ARGUMENT, "role"),
])
def test_grpc_errors_then_a_good_request(grpc_stub, request_, code, named):
    method = grpc_stub.Generate if isinstance(request_, pb.GenerateRequest) else grpc_stub.Chat
    with pytest.raises(grpc.RpcError) as info:
        list(method(request_, metadata=METADATA))
    assert info.value.code() == code and named in info.value.details()
    ok = list(grpc_stub.Generate(pb.GenerateRequest(prompt="hi", sampling=pb.SamplingOptions(max_tokens=2)),
                                 metadata=METADATA))
    assert ok[-1].finish_reason in ("length", "stop")


def test_undecodable_grpc_bytes_through_serve_leave_it_serving(server, grpc_target):
    """Bytes that are no GenerateRequest / ChatRequest, sent through Serve's gRPC proxy: each call
    ends with an error status at once (never a hang, never OK), and the service answers a good
    request after them."""
    import random

    rng = random.Random(0)
    payloads = [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 120))) for _ in range(30)]
    payloads += [b"\x0a\xff\xff\xff\xff\x0f", b"\x12\x05\x0a\x03\xff\xfe\xfd", b"\xff" * 40]
    channel = grpc.insecure_channel(grpc_target)
    codes = set()
    try:
        for i, payload in enumerate(payloads):
            method = channel.unary_stream(f"/glm_ray.v1.Generation/{'Generate' if i % 2 else 'Chat'}")
            try:
                for _ in method(payload, metadata=METADATA, timeout=60):
                    pass
                codes.add(grpc.StatusCode.OK)
            except grpc.RpcError as e:
                assert e.code() != grpc.StatusCode.DEADLINE_EXCEEDED, "a call hung"
                codes.add(e.code())
        ok = list(pb_grpc.GenerationStub(channel).Generate(
            pb.GenerateRequest(prompt="hi", sampling=pb.SamplingOptions(max_tokens=2)), metadata=METADATA))
        assert ok[-1].finish_reason in ("length", "stop")
    finally:
        channel.close()
    # Serve's proxy fails to decode them before our handler runs and says UNKNOWN; ours never gets the bytes
    assert codes <= {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNKNOWN}, codes


def cli(*args, stdin=None, api_key=API_KEY):
    """The glm-ray command line, the key in GLM_RAY_API_KEY (as a user would export it)."""
    env = {k: v for k, v in os.environ.items() if k != "GLM_RAY_API_KEY"}
    if api_key:
        env["GLM_RAY_API_KEY"] = api_key
    return subprocess.run([sys.executable, "-m", "glm_ray.cli", *args], capture_output=True, text=True,
                          timeout=300, input=stdin, env=env)


def test_cli_status_chat_and_bench_against_the_server(server, llm, tmp_path):
    r = cli("status", "--url", server, api_key=None)
    assert r.returncode != 0 and "401" in r.stderr and "API key" in r.stderr
    r = cli("status", "--url", server, "--api-key", API_KEY, api_key=None)
    assert r.returncode == 0, r.stderr
    r = cli("status", "--url", server)
    assert r.returncode == 0, r.stderr
    assert f"glm-ray at {server}: healthy" in r.stdout and "model glm-tiny" in r.stdout
    assert "computing in float32" in r.stdout
    assert "group 0: 4 experts (0-3), 1 replica(s)" in r.stdout and "group 1: 4 experts (4-7)" in r.stdout
    assert "tokens/s" in r.stdout and "busy" in r.stdout  # each group's load
    assert "attention replicas: 1" in r.stdout and "KV cache" in r.stdout
    assert "AttentionReplica 1/1 running" in r.stdout and "ExpertGroup_1 1/1 running" in r.stdout
    assert "balancedness over groups (mean / max tokens per group, 1.0 even): min " in r.stdout

    r = cli("chat", "--url", server, "--temperature", "0", "--max-tokens", "6", "--no-thinking",
            stdin="What is the weather?\n/exit\n")
    assert r.returncode == 0, r.stderr
    want = llm.chat([{"role": "user", "content": "What is the weather?"}], SamplingParams(temperature=0, max_tokens=6),
                    chat_template_kwargs={"enable_thinking": False})[0].outputs[0].text
    assert f"glm> {want}" in r.stdout

    out = tmp_path / "bench.json"
    r = cli("bench", "--url", server, "--workload", "B", "--num-requests", "5", "--scale", "0.05",
            "--concurrency", str(MAX_PENDING), "--output", str(out))
    assert r.returncode == 0, r.stderr
    entry = json.loads(out.read_text())["workloads"]["B"]
    assert entry["server"]["num_requests"] == 5
    assert entry["server"]["num_output_tokens"] == entry["workload"]["num_output_tokens"]
    assert entry["server"]["output_tokens_per_s"] > 0 and entry["server"]["ttft_ms"]["count"] == 5
    assert "server" in r.stdout  # the table row


@pytest.fixture(scope="module")
def scripted(server, tiny_model_dir):
    """The real ingress on Serve (HTTP proxy, channel to the attention side, parsers) over an
    attention deployment that replays canned GLM output: a random-weights model never emits tool calls."""
    from ray import serve

    from fake_backend import GLM_OUTPUT, pieces
    from glm_ray.serving.ingress import Ingress
    from glm_ray.serving.router import ExpertRouter

    router = ExpertRouter.bind({"version": 1, "groups": [list(range(8))]}, 1, 3.0)
    app = Ingress.bind(ScriptedAttention.bind(pieces(GLM_OUTPUT, 3), router), router, [], str(tiny_model_dir),
                       "glm-scripted", {"dtype": "float32", "max_model_len": 4096}, refresh_s=0.2)
    serve.run(app, name="scripted", route_prefix="/scripted")
    yield openai.OpenAI(base_url=f"{server}/scripted/v1", api_key="unused", max_retries=0)
    serve.delete("scripted")


def _scripted_attention():
    """Defined in a function, so Serve ships the classes by value (the test module is not importable
    in a replica)."""
    from ray import serve

    class ScriptedEngine:
        """What AttentionChannelServer needs of an engine: every request replays the script."""

        def __init__(self, script: list[str]):
            self.script = script

        def submit(self, request_id, prompt_token_ids, params, sink, prompt=None, whole=False, resume=None):
            from glm_ray.engine.outputs import RequestDelta

            deltas = [RequestDelta(request_id, [7], piece, None, "stop" if i == len(self.script) - 1 else None, None,
                                   len(prompt_token_ids), i + 1) for i, piece in enumerate(self.script)]
            if whole:
                deltas = [RequestDelta.concat(deltas)]
            threading.Thread(target=lambda: [sink.deliver([d]) for d in deltas], daemon=True).start()

        def abort(self, request_id):
            pass

    @serve.deployment(ray_actor_options={"num_cpus": 0.1})
    class ScriptedAttention:
        async def __init__(self, script: list[str], router):
            import asyncio

            from glm_ray.serving.attention_channel import AttentionChannelServer

            self.channel = AttentionChannelServer(ScriptedEngine(script))
            address = await self.channel.start()
            replica_id = serve.get_replica_context().replica_tag

            async def report():  # as RouterSnapshots does: load and channel address, every refresh
                while True:
                    await router.report_attention.remote(replica_id, {"sequences": 0.0, "running": 0.0,
                                                                      "waiting": 0.0, "kv_usage": 0.0}, address)
                    await asyncio.sleep(0.5)

            self.reporter = asyncio.get_running_loop().create_task(report())

        def engine_stats(self):  # /health's probe
            return {"running": 0, "waiting": 0, "used_blocks": 0, "free_blocks": 1}

    return ScriptedAttention


ScriptedAttention = _scripted_attention()


def test_tool_calls_and_reasoning_through_serve(scripted):
    from fake_backend import TOOLS, WEATHER_ARGS

    messages = [{"role": "user", "content": "Weather?"}]
    whole = scripted.chat.completions.create(model="glm-scripted", messages=messages, tools=TOOLS).choices[0]
    assert whole.finish_reason == "tool_calls" and whole.message.content == "Let me check."
    assert whole.message.reasoning_content == "The user wants weather."
    assert [c.function.name for c in whole.message.tool_calls] == ["get_weather", "get_time"]
    assert json.loads(whole.message.tool_calls[0].function.arguments) == WEATHER_ARGS  # typed by the schema
    assert json.loads(whole.message.tool_calls[1].function.arguments) == {"zone": "0800"}  # a string stays one

    chunks = list(scripted.chat.completions.create(model="glm-scripted", messages=messages, tools=TOOLS,
                                                   stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == "The user wants weather."
    assert "".join(d.content or "" for d in deltas) == "Let me check."
    args = {}
    for d in deltas:
        for call in d.tool_calls or []:
            args[call.index] = args.get(call.index, "") + (call.function.arguments or "")
    assert json.loads(args[0]) == WEATHER_ARGS and json.loads(args[1]) == {"zone": "0800"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
