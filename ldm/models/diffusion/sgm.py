"""SD2 in the module layout of Stability's generative-models ("sgm") checkpoints, such as SD-Turbo's
single file: the text encoder under ``conditioner.embedders.0``, the noise levels as
``denoiser.sigmas``, and no schedule buffers. The UNet and the autoencoder are LatentDiffusion's."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from ldm.checkpoint import CheckpointError
from ldm.models.diffusion.ddpm import LatentDiffusion

# Relative disagreement of ``denoiser.sigmas`` with the config's schedule beyond which a file is
# refused: float32 rounding is ~1e-7. A half-precision file is allowed its own rounding.
SIGMAS_RTOL = 1e-5


class Conditioner(nn.Module):
    """sgm's conditioner as its checkpoint sees it: a list of embedders (SD-Turbo's one is the text encoder)."""

    def __init__(self, *embedders: nn.Module):
        super().__init__()
        self.embedders = nn.ModuleList(embedders)


class DenoiserSigmas(nn.Module):
    """The noise level of each timestep, ``sigmas[t] = sqrt((1 - alphas_cumprod[t]) / alphas_cumprod[t])``:
    the ``denoiser.sigmas`` buffer of sgm files. The samplers read the model's own schedule; this
    buffer records the schedule the file was trained with, so a file whose sigmas disagree with the
    config's schedule is refused when loaded (:meth:`check`).
    """

    keeps_float32_buffers = True  # a noise schedule: ldm.loading keeps it float32 whatever the weights' dtype

    def __init__(self, alphas_cumprod: np.ndarray):
        super().__init__()
        # float64, and no tensor: casting or moving the module never rounds what files are checked against.
        self.expected = np.sqrt((1.0 - alphas_cumprod) / alphas_cumprod)
        # On the CPU even on the meta device, as the schedule buffers: the model has them before loading.
        self.register_buffer("sigmas", torch.tensor(self.expected, dtype=torch.float32, device="cpu"))

    def check(self, sigmas: torch.Tensor) -> None:
        """Raise :class:`CheckpointError` if ``sigmas`` (a file's) are not the config's beyond rounding."""
        rtol = max(SIGMAS_RTOL, torch.finfo(sigmas.dtype).eps)
        given = sigmas.detach().cpu().double().numpy()
        relative = np.abs(given - self.expected) / self.expected
        bad = np.flatnonzero(~(relative <= rtol))  # NaN included
        if bad.size:
            t = int(bad[0])
            raise CheckpointError(
                f"the checkpoint's denoiser.sigmas disagree with the config's noise schedule at {bad.size} of "
                f"{given.size} timesteps (first at t={t}: {given[t]:.6g} in the file, {self.expected[t]:.6g} from "
                f"the config; relative tolerance {rtol:.0e}): the file was trained with another schedule than the "
                "config's timesteps, beta_schedule, linear_start and linear_end describe"
            )

    def _load_from_state_dict(self, state_dict, prefix, *args: Any, **kwargs: Any) -> None:
        # The override point torch offers for checking a module's entries: it runs for load_state_dict
        # with and without assign=True. Missing keys, other shapes and dtypes of another kind are left
        # to the loader's own report.
        sigmas = state_dict.get(prefix + "sigmas")
        if (
            isinstance(sigmas, torch.Tensor)
            and not sigmas.is_meta
            and sigmas.is_floating_point()
            and sigmas.shape == self.sigmas.shape
        ):
            self.check(sigmas)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class SGMLatentDiffusion(LatentDiffusion):
    """:class:`LatentDiffusion` whose state dict is in the sgm layout, so that SD-Turbo's file loads
    strictly with no key renamed (``configs/stable-diffusion/sd-turbo.yaml``), and saving writes that layout.

    * The text encoder lives at ``conditioner.embedders[0]``; ``cond_stage_model`` still names it.
    * The schedule buffers are computed from the config as LatentDiffusion computes them, float32 on
      the model's device, but are not state-dict keys.
    * ``denoiser.sigmas`` is a state-dict key, checked against the config's schedule when loaded.
    """

    persistent_schedule = False

    def register_schedule(self, *args: Any, **kwargs: Any) -> dict[str, np.ndarray]:
        schedule = super().register_schedule(*args, **kwargs)
        self.denoiser = DenoiserSigmas(schedule["alphas_cumprod"])
        return schedule

    @property
    def cond_stage_model(self) -> nn.Module:
        """The text encoder, under LatentDiffusion's name."""
        return self.conditioner.embedders[0]

    @cond_stage_model.setter
    def cond_stage_model(self, encoder: nn.Module) -> None:
        self.conditioner = Conditioner(encoder)

    def __setattr__(self, name: str, value: Any) -> None:
        # nn.Module files an assigned module under the attribute's name, past any property setter:
        # LatentDiffusion's ``self.cond_stage_model = ...`` must reach the setter above.
        if isinstance(getattr(type(self), name, None), property):
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)
