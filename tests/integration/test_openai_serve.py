"""The OpenAI-compatible API of the disaggregated app, with the official `openai` client."""

import pytest
import requests

from glm_ray import LLM, SamplingParams
from glm_ray.serving.config import ServeConfig

from .test_serving import deploy, undeploy

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def server(ray_serve, tiny_model_dir):
    deploy(ServeConfig(model=str(tiny_model_dir), served_model_name="glm-tiny", expert_groups=2, dtype="float32",
                       kv_cache_memory=32 << 20, max_model_len=2048), ray_serve)
    yield ray_serve
    undeploy()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)


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


@pytest.mark.parametrize("body, status", [
    ({"model": "glm-tiny", "prompt": "hi", "temperature": -1}, 400),
    ({"model": "glm-tiny", "prompt": "hi", "max_tokens": 0}, 400),
    ({"model": "glm-tiny", "prompt": "hi", "max_tokens": 5000}, 400),
    ({"model": "nope", "prompt": "hi"}, 404),
])
def test_errors_then_a_good_request(server, client, body, status):
    r = requests.post(f"{server}/v1/completions", json=body, timeout=60)
    assert r.status_code == status
    err = r.json()["error"]
    assert err["message"] and err["type"] and err["code"] == status
    ok = client.completions.create(model="glm-tiny", prompt="hi", max_tokens=2, temperature=0)
    assert ok.choices[0].finish_reason in ("length", "stop")


def test_health_metrics_experts(server):
    assert requests.get(f"{server}/health", timeout=30).status_code == 200
    experts = requests.get(f"{server}/v1/experts", timeout=30).json()
    assert experts["placement"]["groups"] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert all(len(a) == 1 for a in experts["replicas"].values())
    metrics = requests.get(f"{server}/metrics", timeout=30).text
    assert "glm_ray" in metrics
