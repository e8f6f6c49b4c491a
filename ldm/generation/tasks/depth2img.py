"""Depth-to-image: img2img that keeps the input's depth (the 512-depth model, as the original's
scripts/gradio/depth2img.py: edge padding to multiples of 64, MiDaS depth or a given depth map,
strength 1.0 starting from pure noise)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from ldm.generation.argtypes import unit_interval
from ldm.generation.images import demo_padding, load_depth_map, load_padded_image
from ldm.generation.model import Model
from ldm.generation.settings import SamplingSettings
from ldm.generation.tasks.img2img import Img2ImgPipeline


class Depth2ImgPipeline(Img2ImgPipeline):
    """Depth-conditioned image to image with Stable Diffusion 2: a new image with the input's depth."""

    task = "depth2img"
    default_prompt = "a photograph of a castle made of ice"
    families = ("LatentDepth2ImageDiffusion",)
    family_config = "configs/stable-diffusion/v2-midas-inference.yaml"
    step_flags = ("--steps",)
    cli_defaults = {"strength": 0.9, "n_samples": 1, "n_iter": 1}

    def __init__(self, model: Model, sampling: SamplingSettings, image: str | Path, strength: float = 0.9,
                 depth_map: str | Path | None = None, n_samples: int = 1, vae_slice_size: int | None = None):
        padded, size = load_padded_image(image, demo_padding(model.geometry.multiple), "--image")
        self.depth_map = None if depth_map is None else load_depth_map(depth_map)
        self.depth_name = None if depth_map is None else Path(depth_map).name
        super().__init__(model, sampling, padded, strength, n_samples, vae_slice_size)
        self.image_path, self.crop = Path(image), size
        self.c_cat: torch.Tensor | None = None

    def start(self) -> None:
        """Encode the image (a posterior sample for the batch), then its depth once for the run."""
        super().start()
        device, n = self.model.device, self.n_samples
        depth = None if self.depth_map is None else self.depth_map.to(device).expand(n, -1, -1, -1)
        self.c_cat = self.net.depth_conditioning(self.init_image.to(device).expand(n, -1, -1, -1), depth)

    def conditioning(self, prompts: list[str]) -> tuple[Any, Any]:
        c, uc = super().conditioning(prompts)
        c_cat = self.c_cat[: len(prompts)]
        return {"c_concat": [c_cat], "c_crossattn": [c]}, None if uc is None else {"c_concat": [c_cat], "c_crossattn": [uc]}

    def start_from(self, batch_size: int) -> dict[str, Any]:
        start = super().start_from(batch_size)
        if self.strength >= 1.0:  # the demo's full sample: pure noise, the image kept only in its depth
            start["init"] = None
        return start

    def metadata(self) -> dict[str, Any]:
        return {"image": self.image_path.name, "strength": self.strength, "depth_map": self.depth_name or "MiDaS"}

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--image", type=str, required=True, help="the input image, whose depth the result keeps")
        parser.add_argument("--strength", type=unit_interval, default=None,
                            help="how much the image is noised; 1.0 starts from pure noise, keeping only the depth (default: 0.9, or the model config's)")
        parser.add_argument("--depth-map", dest="depth_map", type=str, default=None,
                            help="a greyscale depth image (brighter = nearer) to use instead of MiDaS' estimate")

    @classmethod
    def from_args(cls, model: Model, sampling: SamplingSettings, n_samples: int, vae_slice_size: int | None,
                  args: argparse.Namespace) -> "Depth2ImgPipeline":
        return cls(model, sampling, args.image, args.strength, args.depth_map, n_samples, vae_slice_size)
