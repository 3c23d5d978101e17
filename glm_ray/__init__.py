"""glm-ray: serving GLM-4.5 / GLM-4.6 MoE models on Ray."""

__version__ = "0.1.0"
