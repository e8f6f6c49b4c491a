"""Inpainting: repaint the masked part of an image under the prompt (the 512-inpainting model, as
the original's scripts/gradio/inpainting.py: edge padding to multiples of 64, DDIM with eta 1,
starting noise from NumPy's generator seeded with the seed)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ldm.generation.errors import GenerationError
from ldm.generation.images import demo_padding, load_mask, load_padded_image
from ldm.generation.model import Model
from ldm.generation.pipeline import Pipeline
from ldm.generation.settings import SamplingSettings


class InpaintPipeline(Pipeline):
    """Inpainting with Stable Diffusion 2: repaint where the mask is white."""

    task = "inpaint"
    default_prompt = "a photograph of a cat sitting on a bench"
    families = ("LatentInpaintDiffusion",)
    family_config = "configs/stable-diffusion/v2-inpainting-inference.yaml"
    numpy_start_code = True
    default_eta = 1.0
    cli_defaults = {"steps": 45, "scale": 10.0, "n_samples": 4}

    def __init__(self, model: Model, sampling: SamplingSettings, image: str | Path, mask: str | Path,
                 n_samples: int = 1, vae_slice_size: int | None = None):
        multiple = demo_padding(model.geometry.multiple)
        self.image, size = load_padded_image(image, multiple, "--image")
        self.mask, mask_size = load_mask(mask, multiple)
        if mask_size != size:
            raise GenerationError(f"--mask {mask}: {mask_size[1]}x{mask_size[0]} differs from the image's {size[1]}x{size[0]}")
        self.names = (Path(image).name, Path(mask).name)
        super().__init__(model, sampling, n_samples, vae_slice_size)
        self.crop = size

    def image_size(self) -> tuple[int, int]:
        return tuple(self.image.shape[2:])

    def conditioning(self, prompts: list[str]) -> tuple[Any, Any]:
        c, uc = super().conditioning(prompts)
        device, b = self.model.device, len(prompts)
        image, mask = self.image.to(device).expand(b, -1, -1, -1), self.mask.to(device).expand(b, -1, -1, -1)
        c_cat = self.net.inpaint_conditioning(image, mask)
        return {"c_concat": [c_cat], "c_crossattn": [c]}, None if uc is None else {"c_concat": [c_cat], "c_crossattn": [uc]}

    def metadata(self) -> dict[str, Any]:
        return {"image": self.names[0], "mask": self.names[1]}

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--image", type=str, required=True, help="the image to inpaint")
        parser.add_argument("--mask", type=str, required=True,
                            help="the mask, an image of the same size: white (>= 50%% grey) is repainted, black kept")

    @classmethod
    def from_args(cls, model: Model, sampling: SamplingSettings, n_samples: int, vae_slice_size: int | None,
                  args: argparse.Namespace) -> "InpaintPipeline":
        return cls(model, sampling, args.image, args.mask, n_samples, vae_slice_size)
