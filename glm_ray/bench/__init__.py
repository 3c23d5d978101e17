"""Benchmarks: the engine against transformers' generate, and a decode step against the matmul peak."""

from glm_ray.bench.cli import add_bench_parser, run_bench

__all__ = ["add_bench_parser", "run_bench"]
