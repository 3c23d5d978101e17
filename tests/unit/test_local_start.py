"""`glm-ray serve` and Ray's own authentication: it turns Ray's token auth off only for the loopback
cluster it starts for itself, never for a cluster it joins (RAY_ADDRESS)."""

import os

import pytest
import ray

from glm_ray.serving import local
from glm_ray.serving.config import ServeConfig


class Stop(Exception):
    pass


@pytest.fixture
def init_calls(monkeypatch):
    calls = []

    def fake_init(*args, **kwargs):
        calls.append({"kwargs": kwargs, "auth_mode": os.environ.get("RAY_AUTH_MODE")})
        raise Stop  # nothing past ray.init is needed here

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", fake_init)
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    return calls


def test_joining_a_cluster_keeps_its_authentication(init_calls, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "ray://10.0.0.1:10001")
    with pytest.raises(Stop):
        local.start(ServeConfig())
    assert init_calls == [{"kwargs": {"address": "ray://10.0.0.1:10001"}, "auth_mode": None}]


def test_its_own_local_cluster_runs_without_ray_tokens(init_calls, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(Stop):
        local.start(ServeConfig())
    assert init_calls[0]["auth_mode"] == "disabled" and "address" not in init_calls[0]["kwargs"]
