"""Noise-level schedules of the k-diffusion samplers: which sigmas a run of ``steps`` steps visits.

A model's noise levels are its discrete table ``sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t)``,
t = 0..N-1 (:class:`ModelSigmas`). A schedule picks ``steps`` of them (or values between them),
from the noisiest down, and ends with 0. Everything here is host-side float64: a sampler's loop
reads its sigmas as Python numbers, never from the device.

The schedules, as AUTOMATIC1111, ComfyUI and diffusers name them:

* ``uniform``: the original ldm DDIM/PLMS grid (``1, 1 + N // steps, ...``; diffusers' "leading"
  spacing with ``steps_offset=1``), so that a k-sampler visits the timesteps DDIM does;
* ``karras``: Karras et al. (2022), rho = 7, between the table's smallest and largest sigma;
* ``exponential``: evenly spaced in log sigma;
* ``trailing``: diffusers' "trailing" spacing (999, 999 - N / steps, ..., rounded): SD-Turbo's
  timesteps; also accepted as ``sgm_uniform`` (ComfyUI's, which keeps the fractions, differs by
  less than a timestep);
* ``normal``: evenly spaced timesteps from N-1 to 0, sigma interpolated in log sigma
  (k-diffusion's ``get_sigmas``, ComfyUI's "normal");
* ``simple``: every (N / steps)-th entry of the table from the top (ComfyUI's "simple");
* ``beta``: timesteps at the quantiles of a Beta(0.6, 0.6) distribution (Lee et al. 2024, as
  ComfyUI and AUTOMATIC1111 compute it: timesteps rounded to the table, repeats dropped);
* ``turbo``: generative-models' SD-Turbo subset, timesteps 999, 899, 799, 699 (1 to 4 steps).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ldm.models.diffusion.sampling import make_ddim_timesteps

KARRAS_RHO = 7.0
BETA_ALPHA = BETA_BETA = 0.6
TURBO_TIMESTEPS = (999, 899, 799, 699)


class ModelSigmas:
    """A model's discrete noise levels, ascending with the timestep, and the maps between a
    (fractional) timestep and a sigma: piecewise linear in log sigma, as k-diffusion's
    ``DiscreteSchedule`` (outside the table: its end values)."""

    def __init__(self, alphas_cumprod: torch.Tensor | np.ndarray):
        a = np.asarray(torch.as_tensor(alphas_cumprod).detach().cpu().double().numpy())
        self.sigmas = np.sqrt((1.0 - a) / a)
        self.log_sigmas = np.log(self.sigmas)
        self.timesteps = np.arange(len(a), dtype=np.float64)

    def __len__(self) -> int:
        return len(self.sigmas)

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def sigma_to_t(self, sigma: float) -> float:
        """The fractional timestep of noise level ``sigma`` (> 0)."""
        return float(np.interp(math.log(sigma), self.log_sigmas, self.timesteps))

    def t_to_sigma(self, t: float | np.ndarray) -> np.ndarray:
        return np.exp(np.interp(t, self.timesteps, self.log_sigmas))


def _at_timesteps(levels: ModelSigmas, timesteps) -> list[float]:
    return [float(s) for s in levels.t_to_sigma(np.asarray(timesteps, dtype=np.float64))] + [0.0]


def uniform(levels: ModelSigmas, steps: int) -> list[float]:
    return _at_timesteps(levels, make_ddim_timesteps("uniform", steps, len(levels))[::-1])


def trailing(levels: ModelSigmas, steps: int) -> list[float]:
    return _at_timesteps(levels, _trailing_timesteps(steps, len(levels)))


def _trailing_timesteps(steps: int, n: int) -> np.ndarray:
    return np.round(np.arange(n, 0, -n / steps)) - 1


def karras(levels: ModelSigmas, steps: int) -> list[float]:
    ramp = np.linspace(0.0, 1.0, steps)
    lo, hi = levels.sigma_min ** (1 / KARRAS_RHO), levels.sigma_max ** (1 / KARRAS_RHO)
    return [float(s) for s in (hi + ramp * (lo - hi)) ** KARRAS_RHO] + [0.0]


def exponential(levels: ModelSigmas, steps: int) -> list[float]:
    return [float(s) for s in np.exp(np.linspace(math.log(levels.sigma_max), math.log(levels.sigma_min), steps))] + [0.0]


def normal(levels: ModelSigmas, steps: int) -> list[float]:
    return _at_timesteps(levels, np.linspace(len(levels) - 1, 0, steps))


def simple(levels: ModelSigmas, steps: int) -> list[float]:
    stride = len(levels) / steps
    return _at_timesteps(levels, [len(levels) - 1 - int(i * stride) for i in range(steps)])


def _beta_timesteps(steps: int, n: int) -> list[int]:
    from scipy.stats import beta as beta_distribution

    quantiles = 1.0 - np.linspace(0.0, 1.0, steps, endpoint=False)
    timesteps = np.rint(beta_distribution.ppf(quantiles, BETA_ALPHA, BETA_BETA) * (n - 1)).astype(int)
    return [int(t) for i, t in enumerate(timesteps) if i == 0 or t != timesteps[i - 1]]


def beta(levels: ModelSigmas, steps: int) -> list[float]:
    return _at_timesteps(levels, _beta_timesteps(steps, len(levels)))


def turbo(levels: ModelSigmas, steps: int) -> list[float]:
    return _at_timesteps(levels, TURBO_TIMESTEPS[:steps])


@dataclass(frozen=True)
class Schedule:
    """A named schedule: its sigmas for a model, and how many steps it takes, known before any model
    is loaded (the uniform grid can hold one more than asked, beta fewer)."""

    name: str
    title: str  # as AUTOMATIC1111 spells it in a sampler's name ("DPM++ 2M Karras")
    sigmas: Callable[[ModelSigmas, int], list[float]]
    length: Callable[[int, int], int] = lambda steps, n: steps
    max_steps: int | None = None  # None: as many as the model has timesteps

    def check(self, steps: int, num_timesteps: int) -> int:
        """The number of steps a run of ``steps`` takes on this schedule; ValueError if it cannot be run."""
        most = self.max_steps or num_timesteps
        if not 1 <= steps <= most:
            raise ValueError(f"the {self.name} schedule takes 1 to {most} steps, got {steps}")
        return self.length(steps, num_timesteps)


SCHEDULES: dict[str, Schedule] = {
    s.name: s
    for s in (
        Schedule("uniform", "Uniform", uniform, lambda steps, n: len(make_ddim_timesteps("uniform", steps, n))),
        Schedule("karras", "Karras", karras),
        Schedule("exponential", "Exponential", exponential),
        Schedule("trailing", "SGM Uniform", trailing),
        Schedule("normal", "Normal", normal),
        Schedule("simple", "Simple", simple),
        Schedule("beta", "Beta", beta, lambda steps, n: len(_beta_timesteps(steps, n))),
        Schedule("turbo", "Turbo", turbo, max_steps=len(TURBO_TIMESTEPS)),
    )
}
SCHEDULE_ALIASES = {"sgm_uniform": "trailing", "sgm uniform": "trailing", "leading": "uniform"}


def schedule_named(name: str) -> Schedule:
    """The schedule called ``name`` (case and ``-``/``_``/space insensitive, aliases included)."""
    key = name.strip().lower().replace("-", "_")
    key = SCHEDULE_ALIASES.get(key, SCHEDULE_ALIASES.get(key.replace("_", " "), key))
    try:
        return SCHEDULES[key]
    except KeyError:
        raise ValueError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}") from None
