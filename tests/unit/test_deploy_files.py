"""The files in deploy/: each Serve config file is valid for Ray Serve's own schema, its args are a
ServeConfig (unknown keys fail), it is exactly what `glm-ray config` renders for those args (so
every field carries its current description), and its sizing fits the GPUs it names. The KubeRay
RayService: its serveConfigV2 likewise, its cluster part against the shape KubeRay documents
(ray.io/v1 RayService: serveConfigV2 + rayClusterConfig with headGroupSpec and workerGroupSpecs,
rayStartParams string-valued, custom resources as a quoted JSON string)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from glm_ray.model.known_configs import known_config
from glm_ray.plan import PlanInputs, make_plan
from glm_ray.serving.config import BUILD_APP, ServeConfig
from glm_ray.serving.serve_file import header_of, render

DEPLOY = Path(__file__).parents[2] / "deploy"
SERVE_FILES = sorted(DEPLOY.glob("*.yaml"))
H200 = 141 << 30


def _app_args(data: dict) -> dict:
    ServeDeploySchema.model_validate(data)  # Ray Serve's schema for `serve deploy` files
    apps = data["applications"]
    assert len(apps) == 1 and apps[0]["import_path"] == BUILD_APP and apps[0]["route_prefix"] == "/"
    assert set(apps[0]) == {"name", "route_prefix", "import_path", "args"}  # Serve accepts typos silently
    return apps[0]["args"]


def test_the_expected_files_are_there():
    assert {p.name for p in SERVE_FILES} == {"local.yaml", "glm-4.6.yaml", "glm-4.5-air.yaml"}


@pytest.mark.parametrize("path", SERVE_FILES, ids=lambda p: p.name)
def test_serve_file_is_valid_and_rendered_from_its_config(path):
    text = path.read_text()
    data = yaml.safe_load(text)
    cfg = ServeConfig.model_validate(_app_args(data))  # extra="forbid": a misspelt field fails here
    assert data["http_options"] == {"host": cfg.host, "port": cfg.http_port}
    assert data["grpc_options"]["port"] == cfg.grpc_port
    assert render(cfg, header_of(text)) == text, (
        f"{path.name} is out of step with ServeConfig: python -c \"from glm_ray.serving.serve_file import "
        f"rewrite; rewrite('deploy/{path.name}')\"")
    assert cfg.cluster_secret is None and not cfg.api_keys  # no secret is ever checked in


def test_a_typo_in_args_is_caught():
    data = yaml.safe_load((DEPLOY / "local.yaml").read_text())
    data["applications"][0]["args"]["expert_group"] = 3
    ServeDeploySchema.model_validate(data)  # Serve itself lets it through...
    with pytest.raises(ValueError, match="expert_group"):
        ServeConfig.model_validate(data["applications"][0]["args"])  # ...ServeConfig does not


@pytest.mark.parametrize("name,model", [("glm-4.6.yaml", "glm-4.6"), ("glm-4.5-air.yaml", "glm-4.5-air")])
def test_cluster_files_fit_the_gpus_they_name(name, model):
    cfg = ServeConfig.from_yaml(DEPLOY / name)
    assert cfg.host == "0.0.0.0" and cfg.expert_host == "0.0.0.0" and cfg.dtype == "bfloat16"
    assert cfg.cluster_secret_file and cfg.api_keys_file  # fixed across redeploys, copied by cluster/*.yaml
    assert cfg.attention_resources.resources == {"attention": 1} and cfg.attention_resources.num_gpus == 1
    assert cfg.expert_resources.resources == {"experts": 1} and cfg.expert_resources.num_gpus == 1
    plan = make_plan(PlanInputs(config=known_config(model), model_name=model, gpu_memory_bytes=H200,
                                gpus_per_node=8, expert_groups=cfg.expert_groups, context=cfg.max_model_len))
    assert plan.expert_groups_fit and plan.attention_gpus == 1
    # the KV cache asked for fits beside the weights on one GPU
    assert plan.non_expert_bytes + cfg.kv_cache_memory <= plan.usable_per_gpu.num_bytes
    assert cfg.max_model_len <= known_config(model).max_position_embeddings


def _resources(params: dict) -> dict:
    """KubeRay's rayStartParams `resources: '"{\\"attention\\": 8}"'` -> {"attention": 8}."""
    text = params["resources"]
    assert text.startswith('"') and text.endswith('"'), "KubeRay wants the JSON inside double quotes"
    return json.loads(text[1:-1].replace('\\"', '"'))


def test_kuberay_rayservice():
    doc = yaml.safe_load((DEPLOY / "kuberay" / "rayservice.yaml").read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayService" and doc["metadata"]["name"]
    spec = doc["spec"]
    assert set(spec) == {"serveConfigV2", "rayClusterConfig"}
    assert isinstance(spec["serveConfigV2"], str)  # KubeRay takes the Serve config as one YAML string
    serve_text = spec["serveConfigV2"]
    cfg = ServeConfig.model_validate(_app_args(yaml.safe_load(serve_text)))
    assert render(cfg, "") == serve_text
    assert cfg.cluster_secret is None and cfg.cluster_secret_file is None and not cfg.api_keys  # from the env

    import ray

    cluster = spec["rayClusterConfig"]
    assert set(cluster) <= {"rayVersion", "authOptions", "headGroupSpec", "workerGroupSpecs",
                            "enableInTreeAutoscaling", "autoscalerOptions"}
    assert cluster["rayVersion"] == ray.__version__
    head = cluster["headGroupSpec"]
    assert set(head) <= {"rayStartParams", "template", "serviceType"}
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    assert set(groups) == {"attention", "experts"}
    for spec_ in [head, *groups.values()]:
        assert all(isinstance(v, str) for v in spec_["rayStartParams"].values()), "rayStartParams are strings"
        containers = spec_["template"]["spec"]["containers"]
        assert containers and all(c["name"] and c["image"] for c in containers)
        env = {e["name"]: e for e in containers[0].get("env", [])}
        for name in ("GLM_RAY_CLUSTER_SECRET", "GLM_RAY_API_KEY"):  # on every pod: Serve builds the app on any
            assert "secretKeyRef" in env[name]["valueFrom"]
        assert env["RAY_SERVE_ENABLE_HA_PROXY"]["value"] == "1"  # Serve's HAProxy ingress on every pod
        assert env["RAY_worker_niceness"]["value"] == "0"  # replicas at normal priority on every pod
        mounts = {m["mountPath"] for m in containers[0]["volumeMounts"]}
        assert str(Path(cfg.model).parent) in mounts  # the model directory on every pod
    for name, group in groups.items():
        assert set(group) <= {"groupName", "replicas", "minReplicas", "maxReplicas", "rayStartParams", "template",
                              "numOfHosts", "scaleStrategy", "suspend"}
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        provided = _resources(group["rayStartParams"])
        gpus = int(group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
        assert list(provided) == [name] and provided[name] == gpus  # one replica per GPU
    # enough of each resource for every replica the Serve config asks for
    per_pod = {name: _resources(g["rayStartParams"])[name] for name, g in groups.items()}
    assert cfg.attention_replicas * cfg.attention_resources.resources["attention"] <= \
        per_pod["attention"] * groups["attention"]["replicas"]
    assert cfg.expert_groups * cfg.replicas_of_group(0) * cfg.expert_resources.resources["experts"] <= \
        per_pod["experts"] * groups["experts"]["replicas"]
