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
    router = _Handle(status={"missing_groups": missing, "replicas": {"0": ["a:1"]},
                             "missing_for_s": {str(g): 42.4 for g in missing}},
                     attention_table={"r1": "127.0.0.1:1"} if channels is None else channels)
    backend = ServeBackend(_Handle(engine_stats=engine_stats), router, str(tiny_model_dir), "m", {"dtype": "float32"},
                           expert_wait_s=240)
    return asyncio.run(backend.health())


def test_ready_only_with_attention_and_every_group(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(sb, "ATTENTION_PROBE_S", 0.2)
    ok, detail = _health(tiny_model_dir, {"running": 0}, [])
    assert ok and detail["status"] == "ok" and detail["problems"] == []
    ok, detail = _health(tiny_model_dir, {"running": 0}, [1])
    assert not ok and detail["status"] == "degraded"
    assert detail["problems"] == ["expert group 1 has had no live replica for 42 s: steps that need it wait up to "
                                  "240 s (expert_wait_s) for a replacement, then the requests running fail with a "
                                  "retryable error and queued ones stay queued"]
    ok, detail = _health(tiny_model_dir, RuntimeError("replica died"), [])
    assert not ok and detail["status"] == "unavailable" and "no attention replica answered" in detail["problems"][0]
    ok, detail = _health(tiny_model_dir, "hang", [1])
    assert not ok and detail["status"] == "unavailable" and "TimeoutError" in detail["problems"][0]
    assert "expert group 1" in detail["problems"][1]  # every problem named
    ok, detail = _health(tiny_model_dir, {"running": 0}, [], channels={})
    assert not ok and "no attention replica takes requests" in detail["problems"][0]


def test_the_registry_says_how_long_a_group_has_been_missing():
    from glm_ray.router.registry import ReplicaRegistry

    now = [100.0]
    registry = ReplicaRegistry(2, ttl_s=3.0, clock=lambda: now[0])
    registry.register(0, "a:1", "r0")
    registry.register(1, "b:1", "r1")
    assert registry.missing_for() == {}
    now[0] = 105.5  # b:1 silent for 5.5 s > ttl: group 1 is missing from now on
    registry.heartbeat("a:1")
    assert registry.missing_for() == {1: 0.0}
    now[0] = 130.5
    registry.heartbeat("a:1")
    assert registry.missing_for() == {1: 25.0}
    registry.register(1, "b:2", "r1b")  # a replacement: no longer missing
    assert registry.missing_for() == {}
