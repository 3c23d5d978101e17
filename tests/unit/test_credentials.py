"""Where the app's API keys and cluster secret come from, in order, and the errors that name the
field and file at fault."""

import pytest

from glm_ray.serving.config import ServeConfig
from glm_ray.serving.credentials import dispatch_auth, resolve_api_keys, resolve_cluster_secret

SECRET = "a-cluster-secret-of-enough-length"


def test_api_keys_config_then_file_then_env(tmp_path):
    keys_file = tmp_path / "api-keys"
    keys_file.write_text("k1\n\n  k2  \n")
    env = {"GLM_RAY_API_KEY": "e1,e2"}
    assert resolve_api_keys(ServeConfig(api_keys=["c1"], api_keys_file=str(keys_file)), env) == ["c1"]
    assert resolve_api_keys(ServeConfig(api_keys_file=str(keys_file)), env) == ["k1", "k2"]
    assert resolve_api_keys(ServeConfig(), env) == ["e1", "e2"]
    assert resolve_api_keys(ServeConfig(), {}) == []
    with pytest.raises(ValueError, match="api_keys_file .*missing.*cannot read"):
        resolve_api_keys(ServeConfig(api_keys_file=str(tmp_path / "missing")), {})
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match="holds no key"):
        resolve_api_keys(ServeConfig(api_keys_file=str(tmp_path / "empty")), {})


def test_cluster_secret_config_then_file_then_env_then_random(tmp_path):
    secret_file = tmp_path / "cluster-secret"
    secret_file.write_text(SECRET + "-file\n")
    env = {"GLM_RAY_CLUSTER_SECRET": SECRET + "-env"}
    assert resolve_cluster_secret(ServeConfig(cluster_secret=SECRET, cluster_secret_file=str(secret_file)), env) \
        == SECRET
    assert resolve_cluster_secret(ServeConfig(cluster_secret_file=str(secret_file)), env) == SECRET + "-file"
    assert resolve_cluster_secret(ServeConfig(), env) == SECRET + "-env"
    first, second = resolve_cluster_secret(ServeConfig(), {}), resolve_cluster_secret(ServeConfig(), {})
    assert first != second and len(first) >= 32  # a fresh random secret per deployment
    with pytest.raises(ValueError, match="cluster_secret_file .*cannot read"):
        resolve_cluster_secret(ServeConfig(cluster_secret_file=str(tmp_path / "nope")), {})
    with pytest.raises(ValueError, match="GLM_RAY_CLUSTER_SECRET: the cluster secret has 5 characters") as e:
        resolve_cluster_secret(ServeConfig(), {"GLM_RAY_CLUSTER_SECRET": "short"})
    assert "short" not in str(e.value)  # the value itself is never echoed
    with pytest.raises(ValueError, match="cluster_secret: .*printable ASCII"):
        resolve_cluster_secret(ServeConfig(cluster_secret="an ünprintable secret value"), {})


def test_dispatch_auth_dict_and_no_secret_in_repr(tmp_path):
    cfg = ServeConfig(cluster_secret=SECRET, dispatch_tls={"cert_file": "/c.pem", "key_file": "/k.pem",
                                                          "server_name": "glm-ray-experts"})
    assert dispatch_auth(cfg, {}) == {"secret": SECRET, "tls": {"cert_file": "/c.pem", "key_file": "/k.pem",
                                                                "ca_file": None, "server_name": "glm-ray-experts"}}
    assert SECRET not in repr(cfg) and SECRET not in str(cfg)
    keyed = ServeConfig(api_keys=["visible-only-in-files"])
    assert "visible-only-in-files" not in repr(keyed)
    assert keyed.to_dict()["api_keys"] == ["visible-only-in-files"]  # written out for files on purpose
    assert keyed.to_dict(reveal_secrets=False)["api_keys"] == ["**********"]
