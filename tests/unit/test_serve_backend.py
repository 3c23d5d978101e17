"""ServeBackend.health over stand-in deployment handles: ready only when an attention replica
answers, one takes requests on its channel, and every expert group has a live replica."""

import asyncio

import glm_ray.serving.serve_backend as sb
from glm_ray.serving.serve_backend import ServeBackend


class _Method:
    def __init__(self, result):
        self.result = result

    def remote(self):
        async def call():
            if isinstance(self.result, BaseException):
                raise self.result
            if self.result == "hang":
                await asyncio.sleep(3600)
            return self.result
        return call()


class _Handle:
    def __init__(self, **methods):
        for name, result in methods.items():
            setattr(self, name, _Method(result))

    def options(self, **_):
        return self


def _health(tiny_model_dir, engine_stats, missing, channels=None):
    router = _Handle(status={"missing_groups": missing, "replicas": {"0": ["a:1"]}},
                     attention_table={"r1": "127.0.0.1:1"} if channels is None else channels)
    backend = ServeBackend(_Handle(engine_stats=engine_stats), router, str(tiny_model_dir), "m", {"dtype": "float32"})
    return asyncio.run(backend.health())


def test_ready_only_with_attention_and_every_group(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(sb, "ATTENTION_PROBE_S", 0.2)
    ok, detail = _health(tiny_model_dir, {"running": 0}, [])
    assert ok and detail["status"] == "ok"
    ok, detail = _health(tiny_model_dir, {"running": 0}, [1])
    assert not ok and "expert groups without a live replica: [1]" in detail["status"]
    ok, detail = _health(tiny_model_dir, RuntimeError("replica died"), [])
    assert not ok and "no attention replica answered" in detail["status"]
    ok, detail = _health(tiny_model_dir, "hang", [])
    assert not ok and "TimeoutError" in detail["status"]
    ok, detail = _health(tiny_model_dir, {"running": 0}, [], channels={})
    assert not ok and "no attention replica takes requests" in detail["status"]
