"""The OpenAI front end's `Backend` in the Serve app: requests go to attention replicas over the
ingress channels (attention_links.py: one gRPC stream per attention replica, a step's deltas of
all requests in one message); the router answers health, placement and routing statistics."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from glm_ray.config import load_model_config
from glm_ray.experts.auth import DispatchAuth
from glm_ray.engine.config import EngineLimits, EngineOptions
from glm_ray.engine.kv_cache import kv_bytes_per_token
from glm_ray.model.loader import resolve_dtype
from glm_ray.serving.attention_links import AttentionLinks
from glm_ray.tokenizer import Tokenizer


ATTENTION_PROBE_S = 5.0


class ServeBackend:
    def __init__(self, attention, router, model_dir: str, model_name: str, engine_options: dict,
                 dispatch_auth: dict | None = None, refresh_s: float = 1.0, expert_wait_s: float = 300.0):
        self.attention = attention
        self.expert_wait_s = expert_wait_s  # for /health's account of a missing expert group
        self.router = router
        auth = DispatchAuth.from_dict(dispatch_auth) if dispatch_auth else None
        self.links = AttentionLinks(self._attention_table, auth, refresh_s)
        self.model_name = model_name
        self.tokenizer = Tokenizer.from_pretrained(model_dir)
        config = load_model_config(model_dir)
        options = EngineOptions(**engine_options)
        # the same resolution the engines do, so the edge rejects exactly what they would
        dtype = resolve_dtype(options.dtype, config)  # `auto` is fp32 on a CPU without native bf16
        self.dtype = str(dtype).removeprefix("torch.")
        limits = EngineLimits.resolve(options, config, kv_bytes_per_token(config, dtype))
        self.max_model_len, self.max_output_tokens = limits.max_model_len, limits.max_output_tokens

    async def _attention_table(self) -> dict[str, str]:
        return await self.router.attention_table.remote()

    async def generate(self, request: dict) -> AsyncIterator[dict]:
        async for delta in self.links.generate(request):
            yield delta

    async def health(self) -> tuple[bool, dict]:
        """(ready, detail): ready when an attention replica answers, one takes requests, and every
        expert group has a live replica. detail["status"]: ok; degraded (an expert group has no live
        replica: steps wait for one, up to expert_wait_s); unavailable (no attention replica)."""
        status = await self.router.status.remote()
        problems = []
        try:
            await asyncio.wait_for(self.attention.engine_stats.remote(), ATTENTION_PROBE_S)
        except Exception as e:  # noqa: BLE001 - dead, restarting, or too slow: not ready either way
            problems.append(f"no attention replica answered within {ATTENTION_PROBE_S:.0f} s ({type(e).__name__})")
        if not await self.router.attention_table.remote():
            problems.append("no attention replica takes requests (none has registered its channel with the router)")
        degraded = []
        if status["missing_groups"]:
            since = status.get("missing_for_s") or {}
            for g in status["missing_groups"]:
                gone = f" for {since[str(g)]:.0f} s" if str(g) in since else ""
                degraded.append(f"expert group {g} has had no live replica{gone}: steps that need it wait up to "
                                f"{self.expert_wait_s:.0f} s (expert_wait_s) for a replacement, then the requests "
                                "running fail with a retryable error and queued ones stay queued")
        # replica counts, not addresses: /health stays open when API keys guard everything else
        state = "unavailable" if problems else "degraded" if degraded else "ok"
        detail = {"status": state, "problems": problems + degraded, "model": self.model_name,
                  "replicas": {g: len(a) for g, a in status["replicas"].items()}}
        return state == "ok", detail

    async def experts(self) -> dict:
        status = await self.router.status.remote()
        return {**status, "deployments": await asyncio.to_thread(deployment_states)}

    async def rebalance(self) -> dict:
        """Start a rebalance (router/rebalance.py); a ValueError when refused."""
        return await self.router.rebalance.remote("requested (POST /v1/experts/rebalance)")

    async def stats(self) -> dict:
        """What /metrics shows: demand (summed over attention replicas, and per replica), expert
        groups' replicas, load and balancedness, and every deployment's replicas by state."""
        status = await self.router.status.remote()
        routed = status.get("routed_tokens") or {}
        attention = status.get("attention") or {}
        if not attention:  # no report yet: ask one replica
            engine = await self.attention.engine_stats.remote()
            used, free = engine["used_blocks"], engine["free_blocks"]
            attention = {"": {"running": engine["running"], "waiting": engine["waiting"],
                              "sequences": engine["running"] + engine["waiting"],
                              "kv_usage": used / max(1, used + free)}}
        loads = list(attention.values())
        return {"running": sum(a["running"] for a in loads), "waiting": sum(a["waiting"] for a in loads),
                "kv_cache_usage": sum(a["kv_usage"] for a in loads) / len(loads),
                "attention": {r: a for r, a in attention.items() if r},
                "replicas": {g: len(a) for g, a in status["replicas"].items()}, "routed_tokens": routed,
                "groups": status.get("groups") or {}, "balancedness": status.get("balancedness") or {},
                "rebalance": status.get("rebalance"), "resumed": self.links.resumed,
                "deployments": await asyncio.to_thread(deployment_states)}


_STARTING = ("STARTING", "UPDATING", "RECOVERING", "PENDING_MIGRATION")


def deployment_states() -> dict:
    """{deployment: {"status", "running", "starting", "draining", "replicas"}} of this replica's
    application, from Serve's controller; {} when it cannot be asked (status is informative, never
    worth failing a request). Draining is Serve's STOPPING: a replica finishing its work."""
    from ray import serve

    try:
        app_name = serve.get_replica_context().app_name
        app = serve.status().applications[app_name]
    except Exception:  # noqa: BLE001 - outside a replica, or the controller is busy
        return {}
    out = {}
    for name, d in app.deployments.items():
        states = {str(getattr(state, "value", state)): n for state, n in d.replica_states.items()}
        out[name] = {"status": str(getattr(d.status, "value", d.status)), "running": states.get("RUNNING", 0),
                     "starting": sum(states.get(s, 0) for s in _STARTING), "draining": states.get("STOPPING", 0),
                     "replicas": sum(states.values())}
    return out
