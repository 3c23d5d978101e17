"""glm-ray: serving GLM-4.5 / GLM-4.6 MoE models on Ray."""

__version__ = "0.1.0"

__all__ = ["LLM", "SamplingParams"]


def __getattr__(name):
    # lazy, so `import glm_ray` stays cheap for the CLI and Ray workers
    if name == "LLM":
        from glm_ray.llm import LLM

        return LLM
    if name == "SamplingParams":
        from glm_ray.engine.sampling_params import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'glm_ray' has no attribute {name!r}")
