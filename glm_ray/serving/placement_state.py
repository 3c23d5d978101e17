"""The placement in force, kept in the cluster's key-value store (Ray's GCS, which outlives any
actor) so that a router restarted by Serve goes on from the version its predecessor published
instead of the one the app was built with. One JSON value per app configuration (`state_key`).
A store that cannot be reached is logged and skipped: the router then works from what it has.
"""

from __future__ import annotations

import hashlib
import json
import logging

log = logging.getLogger("glm_ray.router")
NAMESPACE = "glm_ray"


def state_key(model_dir: str, placement: dict, redundant_experts: int, app_name: str = "glm-ray") -> str:
    """One key per app name, checkpoint, starting placement and spare slots: a redeploy of the same
    configuration keeps its rebalanced placement; any change to them starts afresh."""
    what = json.dumps([app_name, str(model_dir), placement.get("groups"), redundant_experts])
    return f"placement/{hashlib.sha256(what.encode()).hexdigest()[:24]}"


def save(key: str | None, placement: dict, next_version: int) -> None:
    if key is None:
        return
    try:
        from ray.experimental import internal_kv

        internal_kv._internal_kv_put(key, json.dumps({"placement": placement, "next_version": next_version}),
                                     overwrite=True, namespace=NAMESPACE)
    except Exception as e:  # noqa: BLE001 - keeping it is a convenience for a later restart
        log.warning("could not keep placement version %s in the cluster's store: %r", placement.get("version"), e)


def load(key: str | None) -> dict | None:
    if key is None:
        return None
    try:
        from ray.experimental import internal_kv

        raw = internal_kv._internal_kv_get(key, namespace=NAMESPACE)
    except Exception as e:  # noqa: BLE001
        log.warning("could not read the kept placement from the cluster's store: %r", e)
        return None
    if raw is None:
        return None
    try:
        saved = json.loads(raw)
        return saved if isinstance(saved.get("placement"), dict) and isinstance(saved.get("next_version"), int) \
            else None
    except (ValueError, AttributeError):
        return None
