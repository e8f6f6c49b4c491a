"""Text to image: sampling from noise under the prompt (the original scripts/txt2img.py)."""

from __future__ import annotations

import argparse

from ldm.generation.argtypes import positive
from ldm.generation.errors import UsageError
from ldm.generation.model import Model
from ldm.generation.pipeline import Pipeline
from ldm.generation.settings import SamplingSettings


def checked_side(flag: str, side: int, model: Model) -> int:
    """``side`` if the model can take it, else a UsageError naming the nearest sides that fit."""
    g = model.geometry
    m = g.multiple
    if side % m:
        lower, upper = side // m * m, side // m * m + m
        nearest = f"{lower} or {upper}" if lower else str(upper)
        raise UsageError(
            f"{flag} {side}: image sides must be multiples of {m} for this model (autoencoder factor "
            f"{g.vae_factor} x UNet downsampling {g.unet_factor}): {m}, {2 * m}, {3 * m}, ...; nearest: {nearest}"
        )
    return side


def requested_size(model: Model, height: int | None, width: int | None) -> tuple[int, int]:
    """``--H``/``--W`` (each the model's native size when not given), checked."""
    native = model.geometry.native_size
    return checked_side("--H", height or native, model), checked_side("--W", width or native, model)


class Txt2ImgPipeline(Pipeline):
    """Text to image with Stable Diffusion 2."""

    task = "txt2img"
    families = ("LatentDiffusion", "SGMLatentDiffusion")
    default_prompt = "a professional photograph of an astronaut riding a triceratops"
    cli_defaults = {"n_samples": 3, "n_iter": 3}

    def __init__(self, model: Model, sampling: SamplingSettings, n_samples: int = 1, height: int | None = None,
                 width: int | None = None, vae_slice_size: int | None = None):
        self.requested_size = (height, width)
        super().__init__(model, sampling, n_samples, vae_slice_size)

    def image_size(self) -> tuple[int, int]:
        return requested_size(self.model, *self.requested_size)

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--H", type=positive, default=None, help="image height in pixels (default: the model's, 512 for SD2 base)")
        parser.add_argument("--W", type=positive, default=None, help="image width in pixels (default: the model's, 512 for SD2 base)")

    @classmethod
    def from_args(cls, model: Model, sampling: SamplingSettings, n_samples: int, vae_slice_size: int | None,
                  args: argparse.Namespace) -> "Txt2ImgPipeline":
        return cls(model, sampling, n_samples, args.H, args.W, vae_slice_size)
