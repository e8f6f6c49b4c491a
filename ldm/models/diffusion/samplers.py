"""The samplers by name: one interface (``sample(S, batch_size, shape, conditioning=..., ...)``)
for DDIM, PLMS and DPM-Solver++, conditioning a tensor or a dict of them."""

from __future__ import annotations

from typing import Any

import torch

from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.dpm_solver import DPMSolverSampler
from ldm.models.diffusion.plms import PLMSSampler

SAMPLERS: dict[str, type] = {"ddim": DDIMSampler, "plms": PLMSSampler, "dpm": DPMSolverSampler}
SAMPLER_TITLES = {"ddim": "DDIM", "plms": "PLMS", "dpm": "DPM-Solver++ (2M)"}


def make_sampler(name: str, model: torch.nn.Module, device: torch.device | str | None = None) -> Any:
    """The sampler called ``name`` over ``model``."""
    try:
        return SAMPLERS[name](model, device=device)
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}") from None
