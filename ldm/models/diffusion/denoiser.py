"""The model as the k-diffusion samplers see it: a denoiser of ``x = x0 + sigma * noise``.

The samplers of :mod:`ldm.models.diffusion.k_samplers` work in the variance-exploding form of
Karras et al. (2022); SD2's UNet works in the variance-preserving one, ``x_vp = x / sqrt(1 + sigma^2)``
at the timestep whose noise level is sigma. This wrapper is the one place that converts between
them, for eps and v models alike, so no sampler knows which kind of model it drives.
"""

from __future__ import annotations

import math

import torch

from ldm.models.diffusion.sampling import GuidedModel, eps_from_v
from ldm.models.diffusion.schedules import ModelSigmas


class Denoiser:
    """``denoiser(x, sigma)``: the clean latents the guided model predicts from ``x`` at noise level
    ``sigma`` (a Python float, > 0).

    The UNet sees ``x / sqrt(1 + sigma^2)`` at the fractional timestep ``levels.sigma_to_t(sigma)``
    (k-diffusion's ``CompVisDenoiser``/``CompVisVDenoiser``). Sigma stays on the host: each call
    launches its work with the numbers it needs and reads nothing back from the device.
    """

    def __init__(self, guided: GuidedModel, levels: ModelSigmas | None = None):
        self.guided = guided
        self.levels = levels if levels is not None else ModelSigmas(guided.model.alphas_cumprod)
        self.v_model = guided.model.parameterization == "v"

    def __call__(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        alpha = 1.0 / math.sqrt(1.0 + sigma * sigma)  # sqrt(alpha_bar) of the VP form
        x_vp = x * alpha
        t = torch.full((x.shape[0],), self.levels.sigma_to_t(sigma), device=x.device)
        out = self.guided(x_vp, t)
        noise = eps_from_v(out, x_vp, alpha, sigma * alpha) if self.v_model else out
        return x - sigma * noise
