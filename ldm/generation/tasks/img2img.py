"""Image to image: noise the init image's latent by ``strength`` of the DDIM steps, then denoise it
under the prompt (the original scripts/img2img.py). Depth-to-image starts the same way."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from ldm.generation.argtypes import unit_interval
from ldm.generation.errors import UsageError
from ldm.generation.images import load_init_image
from ldm.generation.model import Model
from ldm.generation.pipeline import FiniteWatch, Pipeline
from ldm.generation.settings import SamplingSettings
from ldm.models.diffusion.sampling import Sampler
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution


class Img2ImgPipeline(Pipeline):
    """Image to image with Stable Diffusion 2: noise the init image, then denoise it under the prompt."""

    task = "img2img"
    families = ("LatentDiffusion", "SGMLatentDiffusion")
    default_prompt = "a painting of a virus monster playing guitar"
    step_flags = ("--steps", "--ddim_steps")  # the original img2img's name kept as an alias
    cli_defaults = {"strength": 0.8, "n_samples": 2, "n_iter": 1}
    image_flag = "--init-img"

    def __init__(self, model: Model, sampling: SamplingSettings, init_image: str | Path | torch.Tensor,
                 strength: float = 0.8, n_samples: int = 1, vae_slice_size: int | None = None):
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength must be in [0, 1], got {strength}")
        self.image_path = None if isinstance(init_image, torch.Tensor) else Path(init_image)
        self.init_image = init_image if isinstance(init_image, torch.Tensor) else load_init_image(
            str(init_image), model.geometry.multiple, self.image_flag)
        self.strength = strength
        super().__init__(model, sampling, n_samples, vae_slice_size)
        if self.t_enc == 0:
            raise UsageError(f"--strength {strength} of --steps {sampling.steps} denoises no step with {self.sampler.title} "
                             "(steps x strength must be at least 1): raise either")
        self.init_latent = self.noise = None

    def image_size(self) -> tuple[int, int]:
        return tuple(self.init_image.shape[2:])

    @classmethod
    def accepts(cls, sampler: Sampler) -> bool:
        return sampler.starts_midway

    @property
    def t_enc(self) -> int:
        """The steps denoised, the last ``t_enc`` of the schedule (the sampler's rule for ``strength``:
        DDIM's original one stops at steps - 1, the k-samplers' is diffusers' int(strength * steps))."""
        return self.sampler.denoise_steps(self.sampling.steps, self.strength)

    @property
    def steps_per_batch(self) -> int:
        return self.t_enc

    def start(self) -> None:
        """Encode the init image once; its posterior is sampled for the whole batch, as the original does."""
        net = self.net
        parameters = net.encode_first_stage(self.init_image.to(self.model.device)).parameters
        posterior = DiagonalGaussianDistribution(parameters.expand(self.n_samples, -1, -1, -1))
        self.init_latent = net.get_first_stage_encoding(posterior)
        self.noise = torch.randn_like(self.init_latent) if self.sampling.fixed_code else None

    def sample(self, c: Any, uc: Any, batch_size: int, watch: FiniteWatch) -> torch.Tensor:
        return self.sampler.sample(self.net, self.request(c, uc, batch_size, watch, **self.start_from(batch_size)))

    def start_from(self, batch_size: int) -> dict[str, Any]:
        """Where sampling starts: the init latents noised by the strength's share of the steps."""
        noise = None if self.noise is None else self.noise[:batch_size]
        return {"init": self.init_latent[:batch_size], "noise": noise, "denoise_steps": self.t_enc}

    def metadata(self) -> dict[str, Any]:
        return {"init_image": self.image_path.name if self.image_path else "tensor", "strength": self.strength}

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--init-img", type=str, required=True, help="path to the input image")
        parser.add_argument("--strength", type=unit_interval, default=None,
                            help="how much the init image is noised, 1.0 destroys it entirely (default: 0.8, or the model config's)")

    @classmethod
    def from_args(cls, model: Model, sampling: SamplingSettings, n_samples: int, vae_slice_size: int | None,
                  args: argparse.Namespace) -> "Img2ImgPipeline":
        return cls(model, sampling, args.init_img, args.strength, n_samples, vae_slice_size)
