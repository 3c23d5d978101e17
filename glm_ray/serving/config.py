"""One pydantic config for a deployment: the CLI, YAML files and `build_app` all read it."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator


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


class ServeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="checkpoint directory; None builds/uses the built-in tiny model")
    served_model_name: str | None = Field(None, description="the `model` clients send; default the directory's name")
    expert_groups: int = Field(2, ge=1, description="G: routed experts are split into this many groups")
    attention_replicas: int = Field(1, ge=1, description="N: attention replicas (each runs an engine)")
    expert_replicas: int | list[int] = Field(1, description="replicas per expert group: one number for all, or one per group")
    placement: list[list[int]] | None = Field(None, description="expert ids per group; default contiguous ranges")
    dtype: Literal["auto", "float32", "bfloat16"] = Field("auto", description="compute dtype")

    host: str = Field("127.0.0.1", description="HTTP bind address")
    http_port: int = Field(8000, ge=0, le=65535, description="HTTP port of the ingress")
    grpc_port: int = Field(9000, ge=0, le=65535, description="gRPC port of Serve's gRPC proxy")
    expert_host: str = Field("127.0.0.1", description="bind address of expert gRPC servers (0.0.0.0 on clusters)")

    kv_cache_memory: int = Field(512 << 20, ge=1, description="bytes of KV cache per attention replica")
    max_num_seqs: int = Field(64, ge=1, description="sequences running at once per attention replica")
    max_num_batched_tokens: int = Field(2048, ge=1, description="tokens per engine step")
    max_model_len: int | None = Field(None, ge=1, description="prompt + output limit; default the model's")
    max_ongoing_requests: int = Field(256, ge=1, description="Serve's cap on concurrent calls per attention replica")
    microbatches: int = Field(1, ge=1, description="each engine step's sequences in this many groups, run layer by "
                              "layer in turn so one group's expert round trip overlaps the next one's attention "
                              "(pays off when attention and expert groups have their own cores; see BENCHMARKS.md)")
    max_body_bytes: int = Field(32 << 20, ge=1, description="HTTP request bodies above this get 413")
    max_pending_requests: int = Field(256, ge=1, description="requests in flight at the ingress before 429")

    heartbeat_interval_s: float = Field(0.5, gt=0, description="how often expert replicas heartbeat the router")
    heartbeat_ttl_s: float = Field(3.0, gt=0, description="a replica silent this long leaves the routing table")
    snapshot_refresh_s: float = Field(1.0, gt=0, description="how often attention replicas refresh the table")
    expert_wait_s: float = Field(10.0, gt=0, description="how long a step waits for a missing expert group")

    torch_threads: int | None = Field(None, ge=1, description="threads per attention/expert replica, default its "
                                      "whole reserved CPUs, at least 1 (oversubscribed cores thrash): an expert "
                                      "group's torch threads; an attention replica's threads sharing each layer's "
                                      "attention calls (its torch runs one)")

    attention_resources: Resources = Field(default_factory=Resources)
    expert_resources: Resources = Field(default_factory=Resources)
    router_resources: Resources = Field(default_factory=lambda: Resources(num_cpus=0.1))
    ingress_resources: Resources = Field(default_factory=lambda: Resources(num_cpus=0.1))
    graceful_shutdown_timeout_s: float = Field(5.0, ge=0, description="Serve's drain limit per replica")

    @field_validator("expert_replicas")
    @classmethod
    def _positive(cls, v):
        counts = v if isinstance(v, list) else [v]
        if any(c < 1 for c in counts):
            raise ValueError(f"expert_replicas must be >= 1, got {v}")
        return v

    def threads_for(self, resources: Resources) -> int:
        return self.torch_threads or max(1, int(resources.num_cpus))

    def replicas_of_group(self, group: int) -> int:
        if isinstance(self.expert_replicas, int):
            return self.expert_replicas
        if len(self.expert_replicas) != self.expert_groups:
            raise ValueError(f"expert_replicas lists {len(self.expert_replicas)} counts for "
                             f"{self.expert_groups} expert groups")
        return self.expert_replicas[group]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text_or_path: str | Path) -> ServeConfig:
        text = Path(text_or_path).read_text() if Path(str(text_or_path)).is_file() else str(text_or_path)
        return cls.model_validate(yaml.safe_load(text) or {})
