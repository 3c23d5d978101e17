"""The OpenAI front end over HTTP: a real uvicorn server on 127.0.0.1, the official `openai` client
for the happy paths, raw httpx for every error class (each followed by a request that succeeds).

Two servers: the tiny random model through `LocalBackend` (greedy output must equal `LLM`'s), and a
`FakeBackend` that replays canned GLM output (thinking, tool calls), fails or blocks on demand.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest
from openai import OpenAI

from glm_ray.engine.async_engine import AsyncLLMEngine
from glm_ray.engine.config import EngineOptions
from glm_ray.engine.sampling_params import SamplingParams
from glm_ray.llm import LLM
from glm_ray.serving.openai.app import create_app
from glm_ray.serving.openai.backend import Backend, LocalBackend
from glm_ray.serving.openai.reasoning import split, thinking_enabled
from glm_ray.tokenizer import Tokenizer

from fake_backend import GLM_OUTPUT, TOOLS, WEATHER_ARGS, FakeBackend, pieces
from uvicorn_server import UvicornServer

try:
    import httpx
except ImportError:  # newer environments ship it renamed
    import httpx2 as httpx

OPTIONS = dict(dtype="float32", max_model_len=256, max_output_tokens=128)
MODEL = "glm-tiny"


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    eng = AsyncLLMEngine(tiny_model_dir, EngineOptions(**OPTIONS))
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def local(engine):
    server = UvicornServer(create_app(LocalBackend(engine, MODEL)))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    return LLM(tiny_model_dir, **OPTIONS)


@pytest.fixture(scope="module")
def client(local):
    return OpenAI(base_url=local.url + "/v1", api_key="x", max_retries=0)


def greedy(**kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, **kw)


# --- completions ------------------------------------------------------------------------------------


def test_models(client):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    assert models[0].model_extra["dtype"] == "float32"  # what the model computes in


def test_completion_greedy_equals_llm(client, reference):
    prompt = "The weather in Beijing"
    got = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
    want = reference.generate(prompt, greedy(max_tokens=12))[0]
    assert got.choices[0].text == want.outputs[0].text
    assert got.choices[0].finish_reason == want.outputs[0].finish_reason
    assert got.usage.prompt_tokens == len(reference.tokenizer.encode(prompt))
    assert got.usage.completion_tokens == len(want.outputs[0].token_ids)
    assert got.usage.total_tokens == got.usage.prompt_tokens + got.usage.completion_tokens


def test_completion_stream_matches_and_reports_usage(client, reference):
    prompt = "Once upon a time"
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=10, temperature=0,
                                            extra_body={"ignore_eos": True}, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    want = reference.generate(prompt, greedy(max_tokens=10, ignore_eos=True))[0]
    assert text == want.outputs[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert chunks[-1].usage.prompt_tokens == len(reference.tokenizer.encode(prompt))


def test_completion_token_ids_batches_echo_and_logprobs(client, reference):
    ids = reference.tokenizer.encode("hello there")
    default = client.completions.create(model=MODEL, prompt=ids, max_tokens=None, temperature=0,
                                        extra_body={"ignore_eos": True})
    assert default.usage.completion_tokens == 16
    single = client.completions.create(model=MODEL, prompt=ids, max_tokens=5, temperature=0,
                                       extra_body={"ignore_eos": True})
    want = reference.generate({"prompt_token_ids": ids}, greedy(max_tokens=5, ignore_eos=True))[0]
    assert single.choices[0].text == want.outputs[0].text

    batch = client.completions.create(model=MODEL, prompt=["a b", "c d e"], max_tokens=4, temperature=0,
                                      extra_body={"ignore_eos": True}, logprobs=2, echo=True)
    assert [c.index for c in batch.choices] == [0, 1]
    assert batch.usage.completion_tokens == 8
    encode = reference.tokenizer.encode
    assert batch.usage.prompt_tokens == len(encode("a b")) + len(encode("c d e"))
    for choice, prompt in zip(batch.choices, ["a b", "c d e"]):
        assert choice.text.startswith(prompt)
        lp = choice.logprobs
        num_prompt = len(reference.tokenizer.encode(prompt))
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.text_offset) == num_prompt + 4
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        assert all(v <= 0 for v in lp.token_logprobs[1:])
        assert all(2 <= len(top) <= 3 for top in lp.top_logprobs[num_prompt:])
        assert lp.text_offset == sorted(lp.text_offset)

    streamed = client.completions.create(model=MODEL, prompt="x y", max_tokens=3, temperature=0,
                                         extra_body={"ignore_eos": True},
                                         logprobs=1, stream=True)
    tokens = [t for c in streamed for t in (c.choices[0].logprobs.tokens if c.choices[0].logprobs else [])]
    assert len(tokens) == 3


# --- chat ---------------------------------------------------------------------------------------------


def test_chat_greedy_equals_llm_and_streams_the_same(client, reference):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    got = client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=12, temperature=0)
    want = reference.chat(messages, greedy(max_tokens=12))[0]
    prompt = reference.tokenizer.apply_chat_template(messages)
    reasoning, content = split(want.outputs[0].text, thinking_enabled(prompt))
    message = got.choices[0].message
    assert (getattr(message, "reasoning_content", None), message.content) == (reasoning, content)
    assert got.usage.prompt_tokens == len(want.prompt_token_ids)
    assert got.usage.completion_tokens == len(want.outputs[0].token_ids)

    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=12,
                                                 temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed_content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    streamed_reasoning = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or ""
                                 for c in chunks if c.choices)
    assert (streamed_reasoning or None, streamed_content or None) == (reasoning, content)
    assert chunks[-1].usage.completion_tokens == got.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == got.usage.prompt_tokens


def test_chat_thinking_off_text_parts_and_logprobs(client, reference):
    messages = [{"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]}]
    got = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0,
                                         logprobs=True, top_logprobs=3,
                                         extra_body={"chat_template_kwargs": {"enable_thinking": False},
                                                     "ignore_eos": True})
    plain = [{"role": "user", "content": "Hi\nthere"}]
    want = reference.chat(plain, greedy(max_tokens=6, ignore_eos=True), chat_template_kwargs={"enable_thinking": False})
    assert getattr(got.choices[0].message, "reasoning_content", None) is None
    assert got.choices[0].message.content == (want[0].outputs[0].text.lstrip("\n") or None)
    entries = got.choices[0].logprobs.content
    assert len(entries) == got.usage.completion_tokens == 6
    assert all(len(e.top_logprobs) == 3 and e.logprob <= 0 for e in entries)
    assert all(e.top_logprobs[0].logprob >= e.top_logprobs[-1].logprob for e in entries)


# --- fake backend: canned GLM output --------------------------------------------------------------


@pytest.fixture(scope="module")
def fake(tiny_model_dir):
    backend = FakeBackend(Tokenizer.from_pretrained(tiny_model_dir))
    server = UvicornServer(create_app(backend, max_body_bytes=64 << 10, max_pending_requests=1))
    server.backend = backend
    yield server
    server.stop()


@pytest.fixture
def fake_backend(fake):
    b = fake.backend
    b.script, b.finish_reason, b.fail, b.gate = ["hello"], "stop", None, None
    b.entered.clear()
    return b


@pytest.fixture
def fake_client(fake):
    return OpenAI(base_url=fake.url + "/v1", api_key="x", max_retries=0)


def ask(client, **kw):
    return client.chat.completions.create(model="fake", messages=[{"role": "user", "content": "Weather?"}], **kw)


def test_tool_calls_and_reasoning_whole(fake_client, fake_backend):
    fake_backend.script = pieces(GLM_OUTPUT, 7)
    got = ask(fake_client, tools=TOOLS)
    choice = got.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.reasoning_content == "The user wants weather."
    assert choice.message.content == "Let me check."
    calls = choice.message.tool_calls
    assert [c.function.name for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[0].function.arguments) == WEATHER_ARGS
    assert json.loads(calls[1].function.arguments) == {"zone": "0800"}  # schema string: not the number 800
    assert calls[0].id != calls[1].id and calls[0].type == "function"
    assert got.usage.completion_tokens == len(fake_backend.script)

    only_first = ask(fake_client, tools=TOOLS, parallel_tool_calls=False).choices[0].message.tool_calls
    assert [c.function.name for c in only_first] == ["get_weather"]
    named = ask(fake_client, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert named.choices[0].finish_reason == "tool_calls"

    untouched = ask(fake_client, tools=TOOLS, tool_choice="none").choices[0]
    assert untouched.finish_reason == "stop" and not untouched.message.tool_calls
    assert "<tool_call>get_weather" in untouched.message.content


@pytest.mark.parametrize("size", [1, 3, 50])
def test_tool_calls_and_reasoning_streamed(fake_client, fake_backend, size):
    fake_backend.script = pieces(GLM_OUTPUT, size)
    chunks = list(ask(fake_client, tools=TOOLS, stream=True, stream_options={"include_usage": True}))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    content = "".join(d.content or "" for d in deltas)
    reasoning = "".join(getattr(d, "reasoning_content", None) or "" for d in deltas)
    assert (reasoning, content) == ("The user wants weather.", "Let me check.")
    assert all("<" not in (d.content or "") for d in deltas)  # never a partial tag
    names, args, ids, fragments = {}, {}, {}, {}
    for d in deltas:
        for call in d.tool_calls or []:
            if call.function.name is not None:
                assert call.index not in names, "the name is sent once"
                names[call.index], ids[call.index] = call.function.name, call.id
            args[call.index] = args.get(call.index, "") + (call.function.arguments or "")
            fragments[call.index] = fragments.get(call.index, 0) + 1
    assert names == {0: "get_weather", 1: "get_time"}
    assert json.loads(args[0]) == WEATHER_ARGS and json.loads(args[1]) == {"zone": "0800"}
    if size == 1:
        assert fragments[0] > 3, "arguments arrive incrementally"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    assert chunks[-1].usage.completion_tokens == len(fake_backend.script)


def test_thinking_without_tools_and_cut_off(fake_client, fake_backend):
    fake_backend.script = pieces("<think>hmm <b>bold</b>", 2)
    fake_backend.finish_reason = "length"
    whole = ask(fake_client).choices[0]
    assert (whole.message.reasoning_content, whole.message.content, whole.finish_reason) == \
        ("hmm <b>bold</b>", None, "length")
    streamed = [c.choices[0].delta for c in ask(fake_client, stream=True)]
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in streamed) == "hmm <b>bold</b>"


# --- errors -------------------------------------------------------------------------------------------


def _good_completion(url: str, model: str = MODEL) -> None:
    r = httpx.post(url + "/v1/completions", json={"model": model, "prompt": "ok", "max_tokens": 2}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")


def _assert_error(r: httpx.Response, status: int, param=None, contains: tuple[str, ...] = ()):
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert "Traceback" not in error["message"]
    if param is not None:
        assert error["param"] == param, error
    for text in contains:
        assert text in error["message"], error


def _chat(**kw):
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **kw}


BAD_REQUESTS = [
    ("completions", {"model": MODEL, "prompt": "x", "temperature": 2.5}, "temperature"),
    ("completions", {"model": MODEL, "prompt": "x", "temperature": -0.1}, "temperature"),
    ("completions", {"model": MODEL, "prompt": "x", "top_p": 0}, "top_p"),
    ("completions", {"model": MODEL, "prompt": "x", "top_p": 1.5}, "top_p"),
    ("completions", {"model": MODEL, "prompt": "x", "max_tokens": 0}, "max_tokens"),
    ("completions", {"model": MODEL, "prompt": "x", "max_tokens": "5"}, "max_tokens"),
    ("completions", {"model": MODEL, "prompt": "x", "max_tokens": 129}, "max_tokens"),
    ("completions", {"model": MODEL, "prompt": "x", "temperature": "hot"}, "temperature"),
    ("completions", {"model": MODEL, "prompt": "x", "stream": "yes"}, "stream"),
    ("completions", {"model": MODEL, "prompt": "x", "top_k": -5}, "top_k"),
    ("completions", {"model": MODEL, "prompt": "x", "n": 2}, "n"),
    ("completions", {"model": MODEL, "prompt": ""}, "prompt"),
    ("completions", {"model": MODEL, "prompt": [1, "a"]}, "prompt"),
    ("completions", {"model": MODEL, "prompt": [5000]}, None),  # outside the vocabulary
    ("completions", {"model": MODEL, "prompt": "x", "logprobs": 50}, "logprobs"),
    ("completions", {"prompt": "x"}, "model"),
    ("chat/completions", {"model": MODEL, "messages": []}, "messages"),
    ("chat/completions", _chat(messages=[{"role": "wizard", "content": "hi"}]), "messages[0].role"),
    ("chat/completions", _chat(messages=[{"content": "hi"}]), "messages[0].role"),
    ("chat/completions", _chat(messages=[{"role": "user", "content": [{"type": "image_url"}]}]),
     "messages[0].content"),
    ("chat/completions", _chat(messages=[{"role": "user", "content": "a"}, {"role": "assistant", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{not json"}}]}]), "messages"),
    ("chat/completions", _chat(tools=[{"type": "function", "function": {"name": "bad name!"}}]), "tools"),
    ("chat/completions", _chat(tools=[{"type": "retrieval"}]), "tools"),
    ("chat/completions", _chat(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}}),
     "tool_choice"),
    ("chat/completions", _chat(tool_choice="sometimes"), "tool_choice"),
    ("chat/completions", _chat(tool_choice="required"), "tool_choice"),
    ("chat/completions", _chat(top_logprobs=2), "top_logprobs"),
    ("chat/completions", _chat(max_completion_tokens=-1), "max_completion_tokens"),
    ("chat/completions", _chat(chat_template_kwargs=[1]), "chat_template_kwargs"),
]


@pytest.mark.parametrize("endpoint,body,param", BAD_REQUESTS, ids=[f"{e}-{p}-{i}" for i, (e, _, p) in
                                                                    enumerate(BAD_REQUESTS)])
def test_bad_request_is_400_then_good_request_works(local, endpoint, body, param):
    r = httpx.post(f"{local.url}/v1/{endpoint}", json=body, timeout=30)
    _assert_error(r, 400, param)
    _good_completion(local.url)


def test_malformed_json_and_non_object(local):
    for raw in (b"{not json", b"[1, 2]", b""):
        r = httpx.post(f"{local.url}/v1/chat/completions", content=raw,
                       headers={"content-type": "application/json"}, timeout=30)
        _assert_error(r, 400)
        _good_completion(local.url)


def test_context_length_error_names_both_numbers(local, engine):
    limit = engine.engine.limits.max_model_len
    prompt = " ".join(["word"] * 80)
    num_prompt = len(engine.tokenizer.encode(prompt))
    r = httpx.post(f"{local.url}/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 120,
                                                        "temperature": 0}, timeout=30)
    assert num_prompt + 120 > limit
    _assert_error(r, 400, "max_tokens", contains=(str(limit), str(num_prompt), "120"))
    _good_completion(local.url)


def test_unknown_model_is_404_and_unknown_route_is_openai_shaped(local):
    r = httpx.post(f"{local.url}/v1/chat/completions", json=_chat(model="gpt-5"), timeout=30)
    _assert_error(r, 404, "model", contains=("gpt-5",))
    _assert_error(httpx.get(f"{local.url}/v1/nothing", timeout=30), 404)
    _assert_error(httpx.get(f"{local.url}/v1/completions", timeout=30), 405)
    _good_completion(local.url)


def test_body_too_large_is_413(fake, fake_backend):
    big = json.dumps({"model": "fake", "prompt": "x" * (80 << 10)}).encode()
    _assert_error(httpx.post(f"{fake.url}/v1/completions", content=big, timeout=30), 413)
    _good_completion(fake.url, "fake")

    def chunked():  # no content-length: the middleware counts what arrives
        for i in range(0, len(big), 8192):
            yield big[i:i + 8192]

    _assert_error(httpx.post(f"{fake.url}/v1/completions", content=chunked(), timeout=30), 413)
    _good_completion(fake.url, "fake")


def test_too_many_pending_is_429_with_retry_after(fake, fake_backend):
    fake_backend.gate = threading.Event()
    results = {}
    first = threading.Thread(target=lambda: results.update(r=httpx.post(
        f"{fake.url}/v1/completions", json={"model": "fake", "prompt": "x"}, timeout=30)))
    first.start()
    assert fake_backend.entered.wait(10)
    r = httpx.post(f"{fake.url}/v1/chat/completions", json=_chat(model="fake"), timeout=30)
    _assert_error(r, 429)
    assert r.headers["retry-after"] == "1"
    fake_backend.gate.set()
    first.join(10)
    assert results["r"].status_code == 200
    _good_completion(fake.url, "fake")


@pytest.mark.parametrize("stream", [False, True])
def test_backend_failure_is_503_and_rejection_is_400(fake, fake_backend, stream):
    fake_backend.fail = RuntimeError("expert group 3 has no live replica")
    r = httpx.post(f"{fake.url}/v1/chat/completions", json=_chat(model="fake", stream=stream), timeout=30)
    _assert_error(r, 503, contains=("expert group 3",))
    assert r.json()["error"]["type"] == "service_unavailable"
    _assert_error(httpx.get(f"{fake.url}/health", timeout=30), 503)
    fake_backend.fail = ValueError("max_tokens too large for this engine")
    _assert_error(httpx.post(f"{fake.url}/v1/completions", json={"model": "fake", "prompt": "x", "stream": stream},
                             timeout=30), 400)
    fake_backend.fail = None
    _good_completion(fake.url, "fake")


# --- health, metrics, experts --------------------------------------------------------------------


def test_health_metrics_experts(local, fake, fake_backend, client):
    assert httpx.get(f"{local.url}/health").status_code == 200
    client.completions.create(model=MODEL, prompt="metrics", max_tokens=3, temperature=0,
                              extra_body={"ignore_eos": True})
    bad = httpx.post(f"{local.url}/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": -1})
    assert bad.status_code == 400
    text = httpx.get(f"{local.url}/metrics").text
    assert 'glm_ray_requests_total{endpoint="/v1/completions",status="200"}' in text
    assert 'glm_ray_requests_total{endpoint="/v1/completions",status="400"}' in text
    for name in ("glm_ray_time_to_first_token_seconds_count", "glm_ray_inter_token_latency_seconds_count",
                 "glm_ray_prompt_tokens_total", "glm_ray_generation_tokens_total", "glm_ray_num_requests_running",
                 "glm_ray_num_requests_waiting", "glm_ray_kv_cache_usage_ratio"):
        assert name in text
    fake_text = httpx.get(f"{fake.url}/metrics").text
    assert 'glm_ray_expert_group_replicas{group="0"} 2.0' in fake_text
    assert 'glm_ray_expert_group_routed_tokens{group="1"} 50.0' in fake_text
    assert "glm_ray_kv_cache_usage_ratio 0.25" in fake_text
    assert 'glm_ray_expert_group_busy_fraction{group="0"} 0.5' in fake_text
    assert 'glm_ray_expert_group_tokens_per_second{group="1"} 300.0' in fake_text
    assert 'glm_ray_deployment_replicas{deployment="ExpertGroup_0",state="starting"} 1.0' in fake_text
    assert 'glm_ray_deployment_replicas{deployment="AttentionReplica",state="draining"} 1.0' in fake_text
    assert 'glm_ray_attention_sequences{replica="r1"} 3.0' in fake_text
    assert 'glm_ray_attention_kv_cache_usage_ratio{replica="r1"} 0.25' in fake_text
    assert httpx.get(f"{fake.url}/v1/experts").json() == {"replicas": {"0": ["r0"]}}
    assert httpx.get(f"{local.url}/v1/experts").status_code == 200


def test_client_disconnect_mid_stream_aborts_the_request(local, engine):
    body = {"model": MODEL, "prompt": "long", "max_tokens": 100, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{local.url}/v1/completions", json=body, timeout=30) as r:
        assert r.status_code == 200
        next(r.iter_lines())
    deadline = time.monotonic() + 10
    while engine.num_running() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.num_running() == 0
    _good_completion(local.url)


def test_backends_satisfy_the_protocol(engine, fake_backend):
    assert isinstance(LocalBackend(engine, MODEL), Backend)
    assert isinstance(fake_backend, Backend)


def _metric(base_url: str, name: str) -> float:
    for line in httpx.get(f"{base_url}/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def test_a_whole_completion_counts_every_token_in_metrics(local, client):
    """A non-streamed request comes from the engine in one piece; /metrics still sees one TTFT and
    one inter-token gap per later token, from the engine's own token times."""
    names = ("glm_ray_time_to_first_token_seconds_count", "glm_ray_inter_token_latency_seconds_count",
             "glm_ray_generation_tokens_total")
    before = [_metric(local.url, n) for n in names]
    got = client.completions.create(model=MODEL, prompt="count me", max_tokens=6, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert got.usage.completion_tokens == 6
    after = [_metric(local.url, n) for n in names]
    assert [a - b for a, b in zip(after, before)] == [1, 5, 6]


def test_whole_and_streamed_requests_reach_the_backend_as_such(fake_backend, fake_client):
    """Non-streamed requests ask the backend for the output in one piece (no per-token messages
    between deployments); streamed ones for deltas."""
    fake_backend.requests.clear()
    ask(fake_client)
    list(ask(fake_client, stream=True))
    fake_client.completions.create(model="fake", prompt="hi", max_tokens=3)
    assert [r["stream"] for r in fake_backend.requests] == [False, True, False]


@pytest.mark.parametrize("head", [{"id": "cmpl-1", "object": "text_completion", "created": 7, "model": "m ü"}, {}])
def test_sse_chunks_equal_a_whole_serialisation(head):
    """The fixed fields are serialised once per response; every line is what sse() of the whole would be."""
    import json as json_

    from glm_ray.serving.openai.streams import SseChunks, sse

    chunks = SseChunks(head)
    for fields in ({"choices": [{"index": 0, "text": "a\nb \"q\" ü", "finish_reason": None}]},
                   {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}}):
        line = chunks.chunk(**fields)
        assert line == sse({**head, **fields})
        assert json_.loads(line.removeprefix("data: ")) == {**head, **fields}


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_text_with_unicode_line_separators_streams_one_json_per_line(fake, fake_backend, endpoint):
    """U+2028, U+2029 and NEL are line ends to str.splitlines, which httpx's iter_lines uses: raw in a
    `data:` line they would cut its JSON in two. Each is escaped; every line parses; the text is intact."""
    fake_backend.script = ["a\u2028b", "\u2029c\x85", "d\x1c\ne"]
    body = ({"model": "fake", "messages": [{"role": "user", "content": "hi"}], "stream": True} if endpoint == "chat"
            else {"model": "fake", "prompt": "hi", "stream": True, "max_tokens": 8})
    path = "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"
    text = ""
    with httpx.stream("POST", fake.url + path, json=body, timeout=30) as r:
        assert r.status_code == 200
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    for line in lines[:-1]:
        assert line.startswith("data: "), line
        choice = json.loads(line.removeprefix("data: "))["choices"][0]
        text += (choice.get("delta") or {}).get("content") or choice.get("text") or ""
    assert text == "".join(fake_backend.script)


def test_one_limit_for_every_generating_route_counting_each_prompt(tiny_model_dir):
    """A 3-prompt completion holds 3 of 4 places: a 2-prompt one is turned away (429), /v1/generate
    takes the last place, then a chat request is turned away; more prompts than the cap is a 400."""
    from glm_ray.serving.ingress import build_ingress_app

    backend = FakeBackend(Tokenizer.from_pretrained(tiny_model_dir))
    backend.gate = threading.Event()
    server = UvicornServer(build_ingress_app(backend, max_pending_requests=4, max_prompts_per_request=3))
    try:
        held = []

        def hold(path, body):
            t = threading.Thread(target=lambda: held.append(httpx.post(f"{server.url}{path}", json=body, timeout=30)))
            t.start()
            return t

        first = hold("/v1/completions", {"model": "fake", "prompt": ["a", "b", "c"]})
        deadline = time.monotonic() + 10
        while len(backend.requests) < 3:  # its three prompts reached the backend
            assert time.monotonic() < deadline
            time.sleep(0.01)
        r = httpx.post(f"{server.url}/v1/completions", json={"model": "fake", "prompt": [[1, 2], [3]]}, timeout=30)
        _assert_error(r, 429, contains=("3 generations in flight and its 2 prompts would exceed its limit of 4",))
        assert r.headers["retry-after"] == "1"
        second = hold("/v1/generate", {"prompt_token_ids": [1, 2, 3], "max_tokens": 1})
        while len(backend.requests) < 4:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        _assert_error(httpx.post(f"{server.url}/v1/chat/completions", json=_chat(model="fake"), timeout=30), 429)
        _assert_error(httpx.post(f"{server.url}/v1/generate", json={"prompt": "x"}, timeout=30), 429)
        backend.gate.set()
        first.join(10)
        second.join(10)
        assert sorted(r.status_code for r in held) == [200, 200]
        r = httpx.post(f"{server.url}/v1/completions", json={"model": "fake", "prompt": ["a"] * 4}, timeout=30)
        _assert_error(r, 400, "prompt", contains=("4 prompts", "at most 3"))
        # every place came back
        r = httpx.post(f"{server.url}/v1/completions", json={"model": "fake", "prompt": ["a", "b", "c"]}, timeout=30)
        assert r.status_code == 200 and len(r.json()["choices"]) == 3
        metrics = httpx.get(f"{server.url}/metrics", timeout=30).text
        assert 'glm_ray_requests_total{endpoint="/v1/generate",status="429"} 1.0' in metrics
    finally:
        server.stop()


def test_a_prompt_cap_above_the_limit_is_refused():
    from glm_ray.serving.admission import Admission
    from glm_ray.serving.config import ServeConfig

    with pytest.raises(ValueError, match=r"max_prompts_per_request \(300\) exceeds max_pending_requests \(256\)"):
        ServeConfig(max_prompts_per_request=300)
    with pytest.raises(ValueError, match="must be between 1 and the in-flight limit"):
        Admission(4, max_prompts=5)


def test_a_request_over_the_time_limit_is_stopped_and_answered_504(tiny_model_dir):
    """The backend stalls after its first piece: the whole completion gets 504, the streamed one an
    error event after its first chunk, /v1/generate a 504, and each stalled stream was closed (the
    backend's abort path)."""
    from glm_ray.serving.ingress import build_ingress_app
    from glm_ray.serving.timeout import TimedBackend

    class Stalling(FakeBackend):
        closed = 0

        async def generate(self, request):
            try:
                yield {"request_id": request["request_id"], "token_ids": [7], "text": "a", "logprobs": None,
                       "finish_reason": None, "stop_reason": None, "num_prompt_tokens": 1, "num_output_tokens": 1,
                       "prompt_logprobs": None}
                await asyncio.sleep(60)
            finally:
                Stalling.closed += 1

    backend = TimedBackend(Stalling(Tokenizer.from_pretrained(tiny_model_dir)), 0.5)
    server = UvicornServer(build_ingress_app(backend))
    try:
        started = time.monotonic()
        r = httpx.post(f"{server.url}/v1/completions", json={"model": "fake", "prompt": "x"}, timeout=30)
        _assert_error(r, 504, contains=("request_timeout_s (0.5 s)",))
        assert r.json()["error"]["type"] == "timeout" and time.monotonic() - started < 10
        with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=_chat(model="fake", stream=True),
                          timeout=30) as s:
            assert s.status_code == 200
            events = [line for line in s.iter_lines() if line.startswith("data: ")]
        assert '"timeout"' in events[-1] or '"timeout"' in events[-2], events
        r = httpx.post(f"{server.url}/v1/generate", json={"prompt": "x"}, timeout=30)
        _assert_error(r, 504)
        assert Stalling.closed == 3  # every stalled stream was closed, none left generating
    finally:
        server.stop()


def test_templates_and_tokenization_run_off_the_event_loop(tiny_model_dir):
    """Rendering and tokenizing every route's prompt happen on worker threads: a huge prompt does not
    hold up the event loop other requests' streams share."""
    from glm_ray.serving.ingress import build_ingress_app

    seen = []

    class Recording:
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            attr = getattr(self.inner, name)
            if name not in ("encode", "apply_chat_template"):
                return attr

            def recorded(*args, **kwargs):
                try:
                    asyncio.get_running_loop()
                    seen.append((name, "event loop"))
                except RuntimeError:
                    seen.append((name, "worker thread"))
                return attr(*args, **kwargs)
            return recorded

    backend = FakeBackend(Recording(Tokenizer.from_pretrained(tiny_model_dir)))
    server = UvicornServer(build_ingress_app(backend))
    try:
        assert httpx.post(f"{server.url}/v1/completions", json={"model": "fake", "prompt": "x"},
                          timeout=30).status_code == 200
        assert httpx.post(f"{server.url}/v1/chat/completions", json=_chat(model="fake"), timeout=30).status_code == 200
        assert httpx.post(f"{server.url}/v1/generate", json={"prompt": "x"}, timeout=30).status_code == 200
    finally:
        server.stop()
    assert {name for name, _ in seen} == {"encode", "apply_chat_template"}
    assert all(where == "worker thread" for _, where in seen), seen
