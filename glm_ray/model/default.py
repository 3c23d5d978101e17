"""The built-in default model: the tiny preset, created once in a cache directory."""

from __future__ import annotations

import os
from pathlib import Path

# Bump when make-model's output changes, so stale caches are rebuilt rather than reused.
FORMAT_VERSION = 1


def cache_root() -> Path:
    return Path(os.environ.get("GLM_RAY_CACHE", Path.home() / ".cache" / "glm-ray"))


def default_model_dir(preset: str = "tiny", seed: int = 0) -> Path:
    """The directory of the built-in model, building it on first use."""
    from glm_ray.model.synthetic import make_model

    path = cache_root() / "models" / f"{preset}-seed{seed}-v{FORMAT_VERSION}"
    if not (path / "config.json").is_file():
        make_model(path, preset, seed=seed)
    return path
