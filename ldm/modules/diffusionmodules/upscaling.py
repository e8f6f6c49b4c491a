"""Noise augmentation of a conditioning signal with its own diffusion schedule: the x4 upscaler
noises its low-resolution input image in pixel space (and is told the noise level as a class
label); unCLIP's embedding augmentation (:mod:`ldm.modules.encoders.modules`) builds on it."""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from ldm.modules.diffusionmodules.util import diffusion_schedule, make_beta_schedule, q_sample, register_schedule_buffers


class ImageConcatWithNoiseAugmentation(nn.Module):
    """Diffuses its input to a given noise level with its own schedule (``noise_schedule_config``:
    ``beta_schedule``, ``timesteps``, ``linear_start``, ``linear_end``, ``cosine_s``).

    The schedule's buffers are checkpoint keys (``low_scale_model.betas``, ...), as in the
    original. They stay float32 when a model is loaded in half precision
    (``keeps_float32_buffers``), as the noised input must not depend on the weights' dtype.
    ``max_noise_level`` is the highest level the model was trained with (350 for the x4 upscaler);
    ``to_cuda`` is accepted for the original's signature and ignored (the module follows ``.to()``).
    """

    keeps_float32_buffers = True

    def __init__(self, noise_schedule_config: Mapping[str, Any], max_noise_level: int = 1000, to_cuda: bool = False):
        super().__init__()
        schedule = dict(noise_schedule_config)
        betas = make_beta_schedule(
            schedule.pop("beta_schedule", "linear"),
            schedule.pop("timesteps", 1000),
            schedule.pop("linear_start", 1e-4),
            schedule.pop("linear_end", 2e-2),
            schedule.pop("cosine_s", 8e-3),
        )
        if schedule:
            raise TypeError(f"unknown noise_schedule_config entries: {sorted(schedule)}")
        register_schedule_buffers(self, diffusion_schedule(betas))
        self.num_timesteps = len(betas)
        self.max_noise_level = max_noise_level

    def noise_levels(self, noise_level: int | torch.Tensor, batch_size: int) -> torch.Tensor:
        """``noise_level`` (an int, or one per sample) as a long tensor of ``batch_size`` levels,
        checked against the range the model knows (0 to ``max_noise_level``)."""
        levels = torch.as_tensor(noise_level, dtype=torch.long, device=self.betas.device)
        levels = levels.expand(batch_size) if levels.ndim == 0 else levels
        highest = min(self.max_noise_level, self.num_timesteps - 1)
        low, high = int(levels.min()), int(levels.max())  # once per conditioning, not per step
        if levels.shape != (batch_size,) or low < 0 or high > highest:
            raise ValueError(
                f"noise_level must be an int or {batch_size} ints between 0 and {highest}, got {noise_level!r}"
            )
        return levels

    def random_levels(self, x: torch.Tensor) -> torch.Tensor:
        """A level per sample of ``x``, uniform below ``max_noise_level``: the original's training
        augmentation, when no level is given."""
        return torch.randint(0, self.max_noise_level, (x.shape[0],), device=x.device).long()

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """``x_start`` diffused to the levels ``t`` with this module's schedule."""
        return q_sample(self, x_start, t, noise)

    def forward(self, x: torch.Tensor, noise_level: int | torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x diffused to noise_level, the levels)``; the noise is drawn as ``torch.randn_like(x)``,
        after random levels (:meth:`random_levels`) when ``noise_level`` is None."""
        levels = self.noise_levels(self.random_levels(x) if noise_level is None else noise_level, x.shape[0])
        return self.q_sample(x, levels), levels
