"""`build_app(config)`: the whole Serve application from one ServeConfig.

A pure function of the config (it only reads the checkpoint's config.json to size the placement),
used by `glm-ray serve` and by Serve config files (`import_path: glm_ray.serving.app:build_app`).
"""

from __future__ import annotations

from pathlib import Path

from ray.serve import Application

from glm_ray.config import load_model_config
from glm_ray.router.placement import Placement
from glm_ray.serving.attention import AttentionReplica
from glm_ray.serving.autoscaling import expert_autoscaling_by_group, serve_autoscaling_config
from glm_ray.serving.config import ServeConfig
from glm_ray.serving.credentials import dispatch_auth, resolve_api_keys
from glm_ray.serving.expert_group import ExpertGroup
from glm_ray.serving import placement_state
from glm_ray.serving.ingress import Ingress
from glm_ray.serving.router import ExpertRouter


DEFAULT_MODEL_NAME = "glm-ray-tiny"


def resolve_model_dir(config: ServeConfig) -> str:
    if config.model is not None:
        return config.model
    from glm_ray.model.default import default_model_dir

    return str(default_model_dir())


def placement_for(config: ServeConfig, num_experts: int) -> Placement | None:
    """The expert groups' table; None when colocated (`expert_groups: 0`)."""
    if config.expert_groups == 0:
        if config.placement is not None:
            raise ValueError("placement is set but expert_groups is 0 (colocated: every attention replica holds "
                             "every routed expert)")
        if config.redundant_experts:
            raise ValueError("redundant_experts is set but expert_groups is 0 (colocated: there are no groups "
                             "to hold copies)")
        return None
    if config.placement is not None:
        placement = Placement(config.placement)
        if len(placement.groups) != config.expert_groups:
            raise ValueError(f"placement has {len(placement.groups)} groups but expert_groups is "
                             f"{config.expert_groups}")
        if placement.num_experts != num_experts:
            raise ValueError(f"placement covers {placement.num_experts} experts, the model has {num_experts}")
        return placement
    return Placement.contiguous(num_experts, config.expert_groups)


def build_app(config: ServeConfig | dict) -> Application:
    cfg = config if isinstance(config, ServeConfig) else ServeConfig.model_validate(config)
    model_dir = resolve_model_dir(cfg)
    model_config = load_model_config(model_dir)
    placement = placement_for(cfg, model_config.n_routed_experts)
    # no per-call access logs: the router alone would log every heartbeat
    shutdown = dict(graceful_shutdown_timeout_s=cfg.graceful_shutdown_timeout_s,
                    logging_config={"enable_access_log": False})
    auth = dispatch_auth(cfg)  # one secret for every deployment of this app

    router = ExpertRouter.options(ray_actor_options=cfg.router_resources.ray_actor_options(), **shutdown).bind(
        placement.to_dict() if placement else {"version": 0, "groups": []}, cfg.expert_groups, cfg.heartbeat_ttl_s,
        redundant_experts=cfg.redundant_experts, rebalance_threshold=cfg.effective_rebalance_threshold(),
        rebalance_interval_s=cfg.rebalance_interval_s, rebalance_timeout_s=cfg.rebalance_timeout_s,
        state_key=placement_state.state_key(model_dir, placement.to_dict() if placement else {}, cfg.redundant_experts))
    # an expert replica's drain (leave the table, serve until attention replicas re-read it, finish
    # what is computing) must fit in Serve's force-kill deadline
    drain_wait_s, stop_grace_s = cfg.expert_drain_wait_s(), 2.0
    expert_shutdown = {**shutdown, "graceful_shutdown_timeout_s": max(cfg.graceful_shutdown_timeout_s,
                                                                      drain_wait_s + stop_grace_s + 1.0)}
    groups = []
    for g, scaling in enumerate(expert_autoscaling_by_group(cfg.expert_autoscaling, cfg.expert_autoscaling_groups,
                                                             cfg.expert_groups)):
        replicas = ({"autoscaling_config": serve_autoscaling_config(scaling, cfg.autoscaling_metrics_interval_s)}
                    if scaling else {"num_replicas": cfg.replicas_of_group(g)})
        groups.append(ExpertGroup.options(
            name=f"ExpertGroup_{g}", ray_actor_options=cfg.expert_resources.ray_actor_options(), **replicas,
            **expert_shutdown).bind(
            model_dir, g, placement.experts_of(g), cfg.dtype, router, cfg.expert_host, cfg.heartbeat_interval_s,
            cfg.threads_for(cfg.expert_resources), dispatch_auth=auth,
            look_back_s=scaling.look_back_s if scaling else 10.0, drain_wait_s=drain_wait_s,
            stop_grace_s=stop_grace_s, device=cfg.device, expert_backend=cfg.expert_backend))
    engine_options = dict(dtype=cfg.dtype, device=cfg.device, expert_backend=cfg.expert_backend,
                          decode_attention=cfg.decode_attention,
                          max_waiting_requests=cfg.max_waiting_requests, kv_cache_memory=cfg.kv_cache_memory, max_num_seqs=cfg.max_num_seqs,
                          max_num_batched_tokens=cfg.max_num_batched_tokens, max_model_len=cfg.max_model_len,
                          microbatches=cfg.microbatches)
    attention_replicas = (
        {"autoscaling_config": serve_autoscaling_config(cfg.attention_autoscaling, cfg.autoscaling_metrics_interval_s)}
        if cfg.attention_autoscaling else {"num_replicas": cfg.attention_replicas})
    # a replica being scaled down drains itself (its traffic is on the ingress channels, which
    # Serve does not see): attention_drain_s for its generations, then a few seconds to stop
    attention_shutdown = {**shutdown, "graceful_shutdown_timeout_s": cfg.attention_drain_s + 10.0}
    attention = AttentionReplica.options(
        name="AttentionReplica", max_ongoing_requests=cfg.max_ongoing_requests,
        max_queued_requests=cfg.max_queued_requests, **attention_replicas,
        ray_actor_options=cfg.attention_resources.ray_actor_options(), **attention_shutdown).bind(
        model_dir, engine_options, placement.to_dict() if placement else None, router, cfg.snapshot_refresh_s,
        cfg.expert_wait_s,
        cfg.attention_threads(), dispatch_auth=auth, bind_host=cfg.expert_host,
        drain_s=cfg.attention_drain_s)
    model_name = cfg.served_model_name or (Path(model_dir).name if cfg.model else DEFAULT_MODEL_NAME)
    return Ingress.options(ray_actor_options=cfg.ingress_resources.ray_actor_options(),
                           num_replicas=cfg.ingress_replicas, max_queued_requests=cfg.max_queued_requests,
                           **shutdown).bind(
        attention, router, groups, model_dir, model_name, engine_options, cfg.max_body_bytes, cfg.max_pending_requests,
        api_keys=resolve_api_keys(cfg), dispatch_auth=auth, refresh_s=cfg.snapshot_refresh_s,
        max_prompts_per_request=cfg.max_prompts_per_request, request_timeout_s=cfg.request_timeout_s,
        expert_wait_s=cfg.expert_wait_s)
