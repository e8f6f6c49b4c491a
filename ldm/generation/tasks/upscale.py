"""x4 upscaling: a low-resolution image to four times its size under the prompt (the x4 upscaler,
as the original's scripts/gradio/superresolution.py: edge padding to multiples of 64, the low-res
image noised to ``noise_level``, starting noise from NumPy's generator seeded with the seed)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ldm.generation.argtypes import non_negative
from ldm.generation.errors import UsageError
from ldm.generation.images import demo_padding, load_padded_image
from ldm.generation.model import Model
from ldm.generation.pipeline import Pipeline
from ldm.generation.settings import SamplingSettings


class UpscalePipeline(Pipeline):
    """x4 upscaling with Stable Diffusion 2: an image four times the input's size."""

    task = "upscale"
    default_prompt = "a professional photograph"
    families = ("LatentUpscaleDiffusion",)
    family_config = "configs/stable-diffusion/x4-upscaling.yaml"
    numpy_start_code = True
    controllable = False  # its UNet (7 input channels, 256 wide) is not the one SD2.1 ControlNets copy
    cli_defaults = {"steps": 75, "scale": 10.0, "n_samples": 1, "n_iter": 1}

    def __init__(self, model: Model, sampling: SamplingSettings, image: str | Path, noise_level: int = 20,
                 n_samples: int = 1, vae_slice_size: int | None = None):
        # The low-res image is the latent's size: it must fit the UNet's downsampling only.
        self.low_res, size = load_padded_image(image, demo_padding(model.geometry.unet_factor), "--image")
        high = int(model.config.model.params.low_scale_config.params.get("max_noise_level", 350))
        if not 0 <= noise_level <= high:
            raise UsageError(f"--noise_level {noise_level}: must be in [0, {high}] for this model")
        self.noise_level, self.name = noise_level, Path(image).name
        super().__init__(model, sampling, n_samples, vae_slice_size)
        f = model.geometry.vae_factor
        self.crop = (size[0] * f, size[1] * f)

    def image_size(self) -> tuple[int, int]:
        """The output's size: the latent is as large as the padded low-res image, the VAE upsamples it."""
        f = self.model.geometry.vae_factor
        return self.low_res.shape[2] * f, self.low_res.shape[3] * f

    def conditioning(self, prompts: list[str]) -> tuple[Any, Any]:
        c, uc = super().conditioning(prompts)
        return self.net.upscale_conditioning(self.low_res.to(self.model.device), self.noise_level, c, uc)

    def metadata(self) -> dict[str, Any]:
        return {"image": self.name, "noise_level": self.noise_level}

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--image", type=str, required=True, help="the low-resolution image to upscale four times")
        parser.add_argument("--noise_level", type=non_negative, default=20,
                            help="noise added to the low-res image, 0 to 350: more lets the model invent more detail (default: %(default)s)")

    @classmethod
    def from_args(cls, model: Model, sampling: SamplingSettings, n_samples: int, vae_slice_size: int | None,
                  args: argparse.Namespace) -> "UpscalePipeline":
        return cls(model, sampling, args.image, args.noise_level, n_samples, vae_slice_size)
