"""The app's credentials, resolved once where the application is built (`build_app`).

- Client API keys: `api_keys` in the config, else the lines of `api_keys_file`, else
  GLM_RAY_API_KEY (comma-separated).
- The cluster secret of the dispatch plane: `cluster_secret`, else the first line of
  `cluster_secret_file`, else GLM_RAY_CLUSTER_SECRET, else a random one for this deployment. A
  random one changes with every deploy: set one to keep it across redeploys (`glm-ray config`
  writes a fresh one into the file it makes, so redeploying that file keeps it).

Both travel to replicas as deployment arguments, never through logs, /health or /v1/experts.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from glm_ray.experts.auth import DispatchAuth
from glm_ray.serving.api_keys import keys_from_env
from glm_ray.serving.config import ServeConfig

SECRET_ENV_VAR = "GLM_RAY_CLUSTER_SECRET"
MIN_SECRET_CHARS = 16


def new_cluster_secret() -> str:
    return secrets.token_urlsafe(32)


def _lines(field: str, path: str) -> list[str]:
    try:
        text = Path(path).expanduser().read_text()
    except OSError as e:
        raise ValueError(f"{field} {path}: cannot read it ({e.strerror})") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def resolve_api_keys(cfg: ServeConfig, environ=os.environ) -> list[str]:
    if cfg.api_keys:
        return [k.get_secret_value() for k in cfg.api_keys]
    if cfg.api_keys_file:
        keys = _lines("api_keys_file", cfg.api_keys_file)
        if not keys:
            raise ValueError(f"api_keys_file {cfg.api_keys_file} holds no key; remove the field to serve without keys")
        return keys
    return keys_from_env(environ)


def resolve_cluster_secret(cfg: ServeConfig, environ=os.environ) -> str:
    if cfg.cluster_secret is not None:
        secret, source = cfg.cluster_secret.get_secret_value(), "cluster_secret"
    elif cfg.cluster_secret_file:
        secret = (_lines("cluster_secret_file", cfg.cluster_secret_file) or [""])[0]
        source = f"cluster_secret_file {cfg.cluster_secret_file}"
    elif environ.get(SECRET_ENV_VAR):
        secret, source = environ[SECRET_ENV_VAR].strip(), SECRET_ENV_VAR
    else:
        return new_cluster_secret()
    try:
        DispatchAuth(secret=secret)  # what gRPC metadata can carry, checked here rather than in every replica
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None
    if len(secret) < MIN_SECRET_CHARS:
        raise ValueError(f"{source}: the cluster secret has {len(secret)} characters, at least {MIN_SECRET_CHARS} "
                         "are required (make one with `python -c 'import secrets; print(secrets.token_urlsafe(32))'`)")
    return secret


def dispatch_auth(cfg: ServeConfig, environ=os.environ) -> dict:
    """The plain dict expert groups and attention replicas take (glm_ray/experts/auth.py)."""
    tls = cfg.dispatch_tls.model_dump() if cfg.dispatch_tls is not None else None
    return {"secret": resolve_cluster_secret(cfg, environ), "tls": tls}
