"""Stable Diffusion 2 / 2.1 inference and training, faithful to the original ldm code and fast."""

__version__ = "0.1.0"
