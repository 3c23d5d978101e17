"""Every `ray up` config in cluster/ passes Ray's own cluster-config validation, offline.

Two checks, both Ray's: jsonschema against the schema Ray ships (ray/autoscaler/ray-schema.json), and
`validate_config(prepare_config(cfg))`, which also merges the provider's defaults and runs the
provider's preparation (it alone catches, e.g., a local cluster without `head_ip`). Neither reaches
the network: `ray up`'s later step, `bootstrap_config`, would (the AWS provider calls EC2/IAM through
boto3, the GCP provider the Compute/IAM APIs, to fill key pairs, subnets, firewalls, service accounts), so
it is not run here. The test forbids sockets
while validating to prove it.
"""

import copy
import json
import re
import socket
from pathlib import Path

import jsonschema
import pytest
import yaml

import ray.autoscaler
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER_DIR = Path(__file__).parents[2] / "cluster"
CONFIGS = sorted(CLUSTER_DIR.glob("*.yaml"))
SCHEMA = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"cluster-config validation tried to reach the network: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def ray_validate(cfg: dict) -> dict:
    """Ray's checks, as `ray up` runs them before it launches anything; returns the prepared config."""
    jsonschema.validate(cfg, SCHEMA)
    prepared = prepare_config(copy.deepcopy(cfg))
    validate_config(prepared)
    return prepared


def test_the_cluster_dir_has_local_and_cloud_configs():
    assert {p.name for p in CONFIGS} >= {"local.yaml", "aws.yaml", "gcp.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_passes_rays_validation(path, no_network):
    prepared = ray_validate(load(path))
    assert prepared["head_node_type"] in prepared["available_node_types"]


def test_local_declares_attention_and_expert_resources():
    cfg = load(CLUSTER_DIR / "local.yaml")
    assert cfg["provider"]["type"] == "local"
    head_start = " ".join(cfg["head_start_ray_commands"])
    worker_start = " ".join(cfg["worker_start_ray_commands"])
    head_res = json.loads(re.search(r"--resources='([^']*)'", head_start).group(1))
    worker_res = json.loads(re.search(r"--resources='([^']*)'", worker_start).group(1))
    assert head_res["attention"] > 0 and head_res["experts"] > 0  # the head can host both
    assert set(worker_res) == {"experts"} and worker_res["experts"] > 0


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_cloud_node_types_declare_their_resource(name):
    """Attention node types declare `attention`, expert node types `experts`, the head neither."""
    cfg = load(CLUSTER_DIR / name)
    types = cfg["available_node_types"]
    assert types["attention"]["resources"]["attention"] == 8 and "experts" not in types["attention"]["resources"]
    assert types["experts"]["resources"]["experts"] == 8 and "attention" not in types["experts"]["resources"]
    assert not {"attention", "experts"} & set(types[cfg["head_node_type"]]["resources"])
    for node_type in ("attention", "experts"):
        assert 0 <= types[node_type]["min_workers"] <= types[node_type]["max_workers"] <= cfg["max_workers"]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_fields_to_change_are_marked_and_install_order_is_documented(path):
    text = path.read_text()
    marked = [line.split("#", 1)[0].strip() for line in text.splitlines() if "# CHANGE:" in line]
    cfg = load(path)
    must = {"local": ["head_ip:", "worker_ips:", "ssh_user:", "ssh_private_key:"],
            "aws": ["region:", "availability_zone:", "ImageId:", "InstanceType:"],
            "gcp": ["project_id:", "region:", "availability_zone:", "sourceImage:", "machineType:"],
            }[cfg["provider"]["type"]]
    for key in must:
        assert any(m.startswith(key) for m in marked), f"{path.name}: `{key}` is not marked `# CHANGE:`"
    setup = cfg["setup_commands"]
    torch_at = next(i for i, c in enumerate(setup) if "torch==2.13.0" in c)
    glm_at = next(i for i, c in enumerate(setup) if "glm_ray-" in c)
    assert torch_at < glm_at, "torch (pinned) must be installed before glm-ray"
    assert "pip wheel" in text and "git+" in text  # both install routes are described
    assert "SAME PATH on every node" in text  # where the model directory lives


@pytest.mark.parametrize("mutate", [
    lambda c: c.update(max_worker=3),  # an unknown top-level key
    lambda c: c["auth"].update(ssh_port=2222),  # Ray has no ssh_port
    lambda c: c["available_node_types"]["experts"].update(min_worker=1),  # a node type's key misspelt
    lambda c: c["available_node_types"]["experts"].update(resources={"experts": "8"}),  # a count as a string
    lambda c: c.update(head_node_type="haed"),  # the schema allows it; validate_config does not
], ids=["top-level-key", "ssh_port", "node-type-key", "resource-type", "head-type"])
def test_validation_catches_typos_in_aws(mutate, no_network):
    cfg = load(CLUSTER_DIR / "aws.yaml")
    mutate(cfg)
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        ray_validate(cfg)


def test_validation_catches_typos_in_local(no_network):
    cfg = load(CLUSTER_DIR / "local.yaml")
    typo = copy.deepcopy(cfg)
    typo["auth"]["ssh_port"] = 2222
    with pytest.raises(jsonschema.ValidationError, match="ssh_port"):
        ray_validate(typo)
    missing = copy.deepcopy(cfg)
    del missing["provider"]["head_ip"]  # the schema allows it; only the local provider's preparation does not
    with pytest.raises(Exception, match="head_ip"):  # a click.ClickException
        ray_validate(missing)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_ray_token_auth_is_on(path):
    """Every node gets the launcher's Ray token and starts with token authentication on (`ray start --head`
    alone leaves it off unless a token is already there)."""
    cfg = load(path)
    assert cfg["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in cfg[key] if "ray start" in c]
        assert starts and all("RAY_AUTH_MODE=token " in c.split("ray start")[0] for c in starts), cfg[key]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_serve_starts_with_the_haproxy_ingress(path):
    """Every node's Ray starts with Serve's HAProxy ingress on (read when Serve starts): HTTP goes
    straight to the ingress replicas, as `glm-ray serve` has it locally; and with its workers at
    normal priority."""
    cfg = load(path)
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in cfg[key] if "ray start" in c]
        assert starts and all("RAY_SERVE_ENABLE_HA_PROXY=1 " in c.split("ray start")[0] for c in starts), cfg[key]
        # replicas at normal priority (Ray starts workers at nice 15), as `glm-ray serve` has them
        assert all("RAY_worker_niceness=0 " in c.split("ray start")[0] for c in starts), cfg[key]
