"""One pydantic config for a deployment: the CLI, YAML files and `build_app` all read it."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from glm_ray.serving.autoscaling import AttentionAutoscaling, ExpertAutoscaling, ExpertAutoscalingOverride


class Resources(BaseModel):
    """Per-replica resources of one deployment. Fractional CPUs by default so a laptop-sized
    local cluster fits everything; on a real cluster add custom node resources such as
    `{"attention": 1}` or `{"experts": 1}` to pin deployments to node types."""

    model_config = ConfigDict(extra="forbid")
    num_cpus: float = Field(0.25, ge=0, description="CPUs reserved per replica (fractions allowed)")
    num_gpus: float = Field(0, ge=0, description="GPUs reserved per replica (fractions allowed)")
    memory: int | None = Field(None, ge=0, description="bytes of memory reserved per replica")
    resources: dict[str, float] = Field(default_factory=dict, description="custom node resources, e.g. attention: 1")

    def ray_actor_options(self) -> dict:
        opts = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        if self.memory is not None:
            opts["memory"] = self.memory
        if self.resources:
            opts["resources"] = dict(self.resources)
        return opts


class DispatchTLS(BaseModel):
    """TLS for the dispatch plane (attention replicas -> expert-group replicas). Every node needs
    these files at the same paths. Without it the channel is plaintext, authenticated by the
    cluster secret alone: keep it on a private network."""

    model_config = ConfigDict(extra="forbid")
    cert_file: str = Field(description="PEM certificate the expert servers present")
    key_file: str = Field(description="PEM private key of that certificate")
    ca_file: str | None = Field(None, description="PEM CA bundle attention replicas verify the servers with; "
                                "default the certificate itself (a self-signed one)")
    server_name: str | None = Field(None, description="the name the certificate was issued for, checked by "
                                    "clients instead of the server's IP address (e.g. glm-ray-experts)")


class ServeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="checkpoint directory; None builds/uses the built-in tiny model")
    served_model_name: str | None = Field(None, description="the `model` clients send; default the directory's name")
    expert_groups: int = Field(2, ge=0, description="G: routed experts are split into this many groups, each its own "
                               "deployment; 0: colocated, every attention replica holds every routed expert (one "
                               "node, no expert dispatch)")
    attention_replicas: int = Field(1, ge=1, description="N: attention replicas (each runs an engine); with "
                                    "attention_autoscaling, ignored")
    ingress_replicas: int = Field(1, ge=1, description="ingress replicas (HTTP app, gRPC service, tokenizer and chat "
                                  "templates), each with its own max_pending_requests; the HTTP proxy spreads "
                                  "requests over them")
    expert_replicas: int | list[int] = Field(1, description="replicas per expert group: one number for all, or one "
                                             "per group; for an autoscaled group, ignored")
    expert_autoscaling: ExpertAutoscaling | None = Field(None, description="autoscale every expert group on its "
                                                         "replicas' busy fraction; None: fixed expert_replicas")
    expert_autoscaling_groups: dict[int, ExpertAutoscalingOverride | None] = Field(
        default_factory=dict, description="per-group overrides of expert_autoscaling (any of its fields), by group "
        "index; null keeps that group at fixed replicas")
    attention_autoscaling: AttentionAutoscaling | None = Field(None, description="autoscale attention replicas on "
                                                               "sequences per replica and KV-cache use; None: fixed "
                                                               "attention_replicas")
    autoscaling_metrics_interval_s: float = Field(1.0, gt=0, description="how often replicas push their "
                                                  "autoscaling metrics to Serve's controller")
    attention_drain_s: float = Field(300.0, gt=0, description="an attention replica being scaled down or replaced "
                                     "takes no new requests and has this long to finish its generations; what is "
                                     "still running then fails with a retryable 503 / UNAVAILABLE")
    placement: list[list[int]] | None = Field(None, description="expert ids per group; default contiguous ranges")
    redundant_experts: int = Field(0, ge=0, description="R: spare expert slots per group, filled by rebalancing "
                                   "with copies of the hottest experts (their tokens are then split over the "
                                   "copies); 0: no copies (a rebalance can still move experts between groups)")
    rebalance_threshold: float | None = Field(None, ge=0, le=1, description="rebalance when the routing window's "
                                              "balancedness (min over MoE layers) falls below this; None: 0.8 with "
                                              "redundant_experts, else off; 0: off (POST /v1/experts/rebalance "
                                              "still works)")
    rebalance_interval_s: float = Field(60.0, gt=0, description="how often the router checks the threshold")
    rebalance_timeout_s: float = Field(600.0, gt=0, description="a new placement version not loaded by every "
                                       "expert replica within this long is abandoned (the old one stays in force)")
    dtype: Literal["auto", "float32", "bfloat16"] = Field("auto", description="compute dtype: auto is the "
                                                         "checkpoint's (on a CPU without native bf16, float32)")
    device: str = Field("auto", description="where attention and expert replicas compute: auto (a GPU when the "
                        "replica reserved one with num_gpus, else CPU), cpu, cuda or cuda:N")
    expert_backend: Literal["auto", "cpu-kernel", "torch", "deepspeed"] = Field(
        "auto", description="routed-expert compute: auto (GPU: deepspeed when its kernels load, else torch with a "
        "warning; CPU: cpu-kernel), cpu-kernel (CPU only), torch (grouped GEMM, CPU or GPU), deepspeed (DeepSpeed "
        "inference-v2 MoE kernels, GPU only: fails at start-up naming the kernel that cannot load)")
    decode_attention: Literal["torch", "cpu-kernel"] = Field(
        "torch", description="decode attention: torch (its SDPA, as transformers: greedy outputs token-identical), "
        "cpu-kernel (a C kernel reading the paged KV cache in place, fp32 on x86 CPUs with AVX2: faster decode "
        "steps, equal to torch to fp32 rounding only, so greedy outputs can part from transformers' at near ties)")

    host: str = Field("127.0.0.1", description="HTTP bind address")
    http_port: int = Field(8000, ge=0, le=65535, description="HTTP port of the ingress")
    grpc_port: int = Field(9000, ge=0, le=65535, description="gRPC port of Serve's gRPC proxy")
    expert_host: str = Field("127.0.0.1", description="bind address of the dispatch plane's gRPC servers: expert "
                             "groups, and the channels attention replicas take requests on (0.0.0.0 on clusters)")

    kv_cache_memory: int = Field(512 << 20, ge=1, description="bytes of KV cache per attention replica")
    max_num_seqs: int = Field(64, ge=1, description="sequences running at once per attention replica")
    max_num_batched_tokens: int = Field(2048, ge=1, description="tokens per engine step")
    max_model_len: int | None = Field(None, ge=1, description="prompt + output limit; default the model's")
    max_ongoing_requests: int = Field(256, ge=1, description="Serve's cap on concurrent calls per attention replica")
    max_waiting_requests: int = Field(1024, ge=1, description="requests an attention replica's engine keeps waiting "
                                      "for a place in the running batch; beyond, it refuses more (the ingress tries "
                                      "another replica, else 503 / UNAVAILABLE)")
    max_queued_requests: int = Field(1000, ge=1, description="calls Serve holds for the ingress and attention "
                                     "deployments while their replicas are at max_ongoing_requests; beyond, Serve "
                                     "answers 503 at once instead of queueing without bound")
    microbatches: int = Field(1, ge=1, description="each engine step's sequences in this many groups, run layer by "
                              "layer in turn so one group's expert round trip overlaps the next one's attention "
                              "(pays off when attention and expert groups have their own cores; see BENCHMARKS.md)")
    max_body_bytes: int = Field(32 << 20, ge=1, description="HTTP request bodies above this get 413")
    max_pending_requests: int = Field(256, ge=1, description="generations in flight at each ingress replica before "
                                      "429 / RESOURCE_EXHAUSTED, over every generating HTTP route and gRPC, each "
                                      "prompt of a multi-prompt completion counted")
    request_timeout_s: float | None = Field(None, gt=0, description="a generation not finished this long after it "
                                            "started is stopped (its KV cache freed) and answered with 504 / "
                                            "DEADLINE_EXCEEDED (an error event once streaming); None: no limit")
    max_prompts_per_request: int | None = Field(None, ge=1, description="prompts one /v1/completions request may "
                                                "list (400 beyond), at most max_pending_requests; None: 32, or "
                                                "max_pending_requests when that is lower")

    grpc_enabled: bool = Field(True, description="start Serve's gRPC proxy; it binds every interface "
                               "([::]:grpc_port) whatever `host` says, as Serve allows no other address: turn it "
                               "off, or set api_keys, where that port is reachable")
    api_keys: list[SecretStr] = Field(default_factory=list, description="client API keys: when any is set, "
                                      "HTTP needs `Authorization: Bearer KEY` (else 401) and gRPC `authorization` "
                                      "metadata (else UNAUTHENTICATED) on every route but /health; empty: "
                                      "api_keys_file, else GLM_RAY_API_KEY (comma-separated) where the app is built")
    api_keys_file: str | None = Field(None, description="a file of client API keys, one per line (the same on "
                                      "every node: Serve may build the app on any of them)")
    cluster_secret: SecretStr | None = Field(None, description="shared secret every ExpertService call carries, "
                                             "checked by expert servers in constant time; None: "
                                             "cluster_secret_file, else GLM_RAY_CLUSTER_SECRET where the app is "
                                             "built, else a random one per deployment. Set it for a secret that "
                                             "survives redeploys")
    cluster_secret_file: str | None = Field(None, description="a file holding the cluster secret (first line)")
    dispatch_tls: DispatchTLS | None = Field(None, description="TLS on the dispatch plane; None: plaintext")

    heartbeat_interval_s: float = Field(0.5, gt=0, description="how often expert replicas heartbeat the router")
    heartbeat_ttl_s: float = Field(3.0, gt=0, description="a replica silent this long leaves the routing table")
    snapshot_refresh_s: float = Field(1.0, gt=0, description="how often attention replicas refresh the table")
    expert_wait_s: float = Field(300.0, gt=0, description="how long a step waits for an expert group with no live "
                                 "replica (long enough for Serve to start a replacement and load its experts; "
                                 "/health says degraded meanwhile); then the requests running on that attention "
                                 "replica fail with a retryable 503 / UNAVAILABLE and queued ones stay queued")

    torch_threads: int | None = Field(None, ge=1, description="threads per attention/expert replica, default its "
                                      "whole reserved CPUs, at least 1 (oversubscribed cores thrash): an expert "
                                      "group's torch threads; an attention replica's threads sharing each layer's "
                                      "attention calls (its torch runs one); colocated (expert_groups 0), the "
                                      "engine's torch threads, default every core of its node but one unless "
                                      "attention_resources reserves 1 CPU or more (set it when several attention "
                                      "replicas share a node)")

    attention_resources: Resources = Field(default_factory=Resources, description="per attention replica; on a "
                                           "cluster add resources: {attention: 1} (and num_gpus) to place it on "
                                           "attention nodes")
    expert_resources: Resources = Field(default_factory=Resources, description="per expert-group replica; on a "
                                        "cluster add resources: {experts: 1} (and num_gpus)")
    router_resources: Resources = Field(default_factory=lambda: Resources(num_cpus=0.1),
                                        description="the router (one replica, off the hot path)")
    ingress_resources: Resources = Field(default_factory=lambda: Resources(num_cpus=0.1),
                                         description="the ingress (HTTP app, gRPC service, tokenizer)")
    graceful_shutdown_timeout_s: float = Field(5.0, ge=0, description="Serve's drain limit per replica")

    @field_validator("device")
    @classmethod
    def _device(cls, v):
        from glm_ray.device import check_device

        return check_device(v)

    @field_validator("expert_replicas")
    @classmethod
    def _positive(cls, v):
        counts = v if isinstance(v, list) else [v]
        if any(c < 1 for c in counts):
            raise ValueError(f"expert_replicas must be >= 1, got {v}")
        return v

    @model_validator(mode="after")
    def _autoscaling_fits(self):
        from glm_ray.serving.autoscaling import expert_autoscaling_by_group

        expert_autoscaling_by_group(self.expert_autoscaling, self.expert_autoscaling_groups, self.expert_groups)
        autoscaled = [a for a in [self.attention_autoscaling, *([self.expert_autoscaling] if self.expert_autoscaling
                                                                 else [])] if a is not None]
        for a in autoscaled:
            if a.look_back_s <= self.autoscaling_metrics_interval_s:
                raise ValueError(f"look_back_s ({a.look_back_s}) must exceed autoscaling_metrics_interval_s "
                                 f"({self.autoscaling_metrics_interval_s}): Serve averages several pushes")
        return self

    @model_validator(mode="after")
    def _prompts_fit(self):
        if self.max_prompts_per_request is not None and self.max_prompts_per_request > self.max_pending_requests:
            raise ValueError(f"max_prompts_per_request ({self.max_prompts_per_request}) exceeds "
                             f"max_pending_requests ({self.max_pending_requests}): such a request could never be "
                             "admitted")
        return self

    def expert_drain_wait_s(self) -> float:
        """How long a draining expert replica keeps serving after leaving the routing table: until
        every attention replica has re-read the table (each does every snapshot_refresh_s)."""
        return 2 * self.snapshot_refresh_s + 0.5

    def threads_for(self, resources: Resources) -> int:
        return self.torch_threads or max(1, int(resources.num_cpus))

    def attention_threads(self) -> int | None:
        """An attention replica's threads (see torch_threads); None: every core it may run on but one."""
        if self.expert_groups == 0 and not self.torch_threads and self.attention_resources.num_cpus < 1:
            return None
        return self.threads_for(self.attention_resources)

    def effective_rebalance_threshold(self) -> float:
        if self.rebalance_threshold is not None:
            return self.rebalance_threshold
        return 0.8 if self.redundant_experts else 0.0

    def replicas_of_group(self, group: int) -> int:
        if isinstance(self.expert_replicas, int):
            return self.expert_replicas
        if len(self.expert_replicas) != self.expert_groups:
            raise ValueError(f"expert_replicas lists {len(self.expert_replicas)} counts for "
                             f"{self.expert_groups} expert groups")
        return self.expert_replicas[group]

    def to_dict(self, *, reveal_secrets: bool = True) -> dict:
        """Plain data for YAML; secrets written out in full unless `reveal_secrets` is False."""
        out = self.model_dump(mode="json")
        if reveal_secrets:
            out["api_keys"] = [k.get_secret_value() for k in self.api_keys]
            out["cluster_secret"] = self.cluster_secret.get_secret_value() if self.cluster_secret else None
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text_or_path: str | Path) -> ServeConfig:
        """A ServeConfig YAML, or a Serve config file (`applications:` with this package's
        `build_app` as import_path; its `args` are the ServeConfig), as text or a path."""
        text = str(text_or_path)
        if "\n" not in text and Path(text).is_file():
            text = Path(text).read_text()
        data = yaml.safe_load(text) or {}
        if isinstance(data, dict) and "applications" in data:
            data = args_of_serve_config(data)
        return cls.model_validate(data)


BUILD_APP = "glm_ray.serving.app:build_app"


def args_of_serve_config(data: dict) -> dict:
    """The ServeConfig args of the one glm-ray application in a Serve config file."""
    apps = [a for a in data.get("applications") or [] if isinstance(a, dict) and a.get("import_path") == BUILD_APP]
    if len(apps) != 1:
        raise ValueError(f"a Serve config file given as a glm-ray config must hold exactly one application with "
                         f"import_path {BUILD_APP}; found {len(apps)}")
    return apps[0].get("args") or {}
