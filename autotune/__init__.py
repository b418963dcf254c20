"""A general autotuner for Triton kernels, with a persistent per-GPU cache."""

from .config import Config

__all__ = ["Config"]
