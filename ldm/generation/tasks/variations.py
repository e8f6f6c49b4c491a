"""Image variations: new images from the CLIP embedding of an input image and a prompt (stable
unCLIP-L or -H, as the original's scripts/streamlit/stableunclip.py: the input resized down to
multiples of 64, its embedding noise-augmented to ``noise_level``, guidance away from a zero embedding)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ldm.generation.argtypes import non_negative, positive
from ldm.generation.errors import GenerationError, UsageError
from ldm.generation.images import load_init_image
from ldm.generation.model import Model
from ldm.generation.pipeline import Pipeline
from ldm.generation.settings import SamplingSettings
from ldm.generation.tasks.txt2img import requested_size


class VariationsPipeline(Pipeline):
    """Image variations with stable unCLIP (SD 2.1): new images in the manner of the input."""

    task = "variations"
    script = "unclip.py"
    default_prompt = "a professional photograph"
    families = ("ImageEmbeddingConditionedLatentDiffusion",)
    family_config = "configs/stable-diffusion/v2-1-stable-unclip-h-inference.yaml"
    cli_defaults = {"steps": 20, "scale": 10.0, "n_samples": 1, "n_iter": 1}

    def __init__(self, model: Model, sampling: SamplingSettings, image: str | Path, noise_level: int = 0,
                 n_samples: int = 1, height: int | None = None, width: int | None = None,
                 clip_stats: str | Path | None = None, vae_slice_size: int | None = None):
        self.image = load_init_image(str(image), 64, "--image")
        params = model.config.model.params.get("noise_aug_config", {}).get("params", {})
        high = int(params.get("max_noise_level", 1000))
        if not 0 <= noise_level < high:
            raise UsageError(f"--noise_level {noise_level}: must be in [0, {high - 1}] for this model")
        if clip_stats is not None and not Path(clip_stats).is_file():
            raise GenerationError(f"--clip_stats {clip_stats}: no such file")
        self.noise_level, self.clip_stats, self.name = noise_level, clip_stats, Path(image).name
        self.requested_size = (height, width)
        super().__init__(model, sampling, n_samples, vae_slice_size)

    def image_size(self) -> tuple[int, int]:
        return requested_size(self.model, *self.requested_size)

    def start(self) -> None:
        augmentor = self.net.noise_augmentor
        if self.clip_stats is not None and augmentor is not None:
            augmentor.load_clip_stats(self.clip_stats)
        super().start()

    def conditioning(self, prompts: list[str]) -> tuple[Any, Any]:
        c, uc = super().conditioning(prompts)
        try:
            return self.net.image_conditioning(self.image.to(self.model.device), self.noise_level, c, uc)
        except FileNotFoundError as e:  # unCLIP-L without Karlo's CLIP statistics
            raise GenerationError(f"{e} (pass it with --clip_stats PATH)") from None

    def metadata(self) -> dict[str, Any]:
        return {"image": self.name, "noise_level": self.noise_level}

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--image", type=str, required=True, help="the image to make variations of")
        parser.add_argument("--noise_level", type=non_negative, default=0,
                            help="noise added to the image's CLIP embedding, 0 to 999: more strays further from it (default: %(default)s)")
        parser.add_argument("--H", type=positive, default=None, help="image height in pixels (default: the model's, 768)")
        parser.add_argument("--W", type=positive, default=None, help="image width in pixels (default: the model's, 768)")
        parser.add_argument("--clip_stats", type=str, default=None,
                            help="unCLIP-L only: Karlo's CLIP embedding statistics, ViT-L-14_stats.th (not part of the checkpoint)")

    @classmethod
    def from_args(cls, model: Model, sampling: SamplingSettings, n_samples: int, vae_slice_size: int | None,
                  args: argparse.Namespace) -> "VariationsPipeline":
        return cls(model, sampling, args.image, args.noise_level, n_samples, args.H, args.W, args.clip_stats, vae_slice_size)
