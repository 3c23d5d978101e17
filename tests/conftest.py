import os

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """The tiny preset, seed 0, built once per test session."""
    from glm_ray.model.synthetic import make_model

    return make_model(tmp_path_factory.mktemp("models") / "tiny", "tiny", seed=0)
