"""What every sampler shares: the one interface the pipelines call (:class:`Sampler`, a batch's
:class:`SampleRequest`), the guided model call, and the DDIM timestep schedule, computed as the
original code computes it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import numpy as np
import torch


def concat_conditioning(uncond: Any, cond: Any) -> Any:
    """Stack unconditional and conditional inputs (tensors, lists or dicts of them, or objects that
    batch themselves with a ``concat`` method, as ControlNet controls) into one batch."""
    if isinstance(cond, dict):
        return {k: concat_conditioning(uncond[k], cond[k]) for k in cond}
    if isinstance(cond, list):
        return [concat_conditioning(u, c) for u, c in zip(uncond, cond)]
    if hasattr(cond, "concat"):
        return uncond.concat(cond)
    return torch.cat([uncond, cond])


class GuidedModel:
    """The model under classifier-free guidance, as a function of (x, t).

    Unconditional and conditional inputs run as one batched UNet call (uncond first, as the
    original); their conditioning batch is built once here, not at every step. At scale 1 the
    formula is the conditional prediction and at scale 0 the unconditional one: one unbatched call.
    """

    def __init__(self, model, cond: Any, uncond: Any = None, scale: float = 1.0):
        self.model = model
        self.scale = scale
        self.guided = uncond is not None and scale not in (0.0, 1.0)
        if self.guided:
            self.cond = concat_conditioning(uncond, cond)
        else:
            self.cond = uncond if uncond is not None and scale == 0.0 else cond

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if not self.guided:
            return self.model.apply_model(x, t, self.cond)
        out_uncond, out_cond = self.model.apply_model(torch.cat([x, x]), torch.cat([t, t]), self.cond).chunk(2)
        return out_uncond + self.scale * (out_cond - out_uncond)

    def predict(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The noise estimate at integer timesteps ``t``, and for v-models also the x0 the
        v-prediction implies (the original DDIM takes x0 from v directly, not from the noise)."""
        out = self(x, t)
        if self.model.parameterization != "v":
            return out, None
        return self.model.predict_eps_from_z_and_v(x, t, out), self.model.predict_start_from_z_and_v(x, t, out)


def eps_from_v(v: torch.Tensor, x: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The noise a v-prediction implies for ``x = alpha * x0 + sigma * noise``: every sampler's
    v-to-eps conversion (v = alpha * noise - sigma * x0, with alpha^2 + sigma^2 = 1)."""
    return alpha * v + sigma * x


def make_ddim_timesteps(method: str, num_ddim_timesteps: int, num_ddpm_timesteps: int) -> np.ndarray:
    """The DDPM timesteps a DDIM/PLMS run visits, ascending, with the original's +1 offset."""
    if num_ddim_timesteps < 1:
        raise ValueError(f"the number of sampling steps must be at least 1, got {num_ddim_timesteps}")
    if num_ddim_timesteps > num_ddpm_timesteps:
        raise ValueError(f"at most {num_ddpm_timesteps} sampling steps, got {num_ddim_timesteps}")
    if method == "uniform":
        c = num_ddpm_timesteps // num_ddim_timesteps
        steps = np.asarray(list(range(0, num_ddpm_timesteps, c)))
    elif method == "quad":
        steps = ((np.linspace(0, np.sqrt(num_ddpm_timesteps * 0.8), num_ddim_timesteps)) ** 2).astype(int)
    else:
        raise NotImplementedError(f"no DDIM discretization method called {method!r}")
    # The original shifts the grid by one ("to get the final alpha values right"): the run
    # ends at step 1, whose update lands on alphas_cumprod[0].
    steps = steps + 1
    if steps[-1] >= num_ddpm_timesteps:
        def fits(n: int) -> bool:  # the uniform grid of n steps ends inside the schedule
            return range(0, num_ddpm_timesteps, num_ddpm_timesteps // n)[-1] + 1 < num_ddpm_timesteps
        near = sorted((n for n in range(1, num_ddpm_timesteps + 1) if fits(n)), key=lambda n: abs(n - num_ddim_timesteps))[:2]
        raise ValueError(
            f"{num_ddim_timesteps} {method} steps would visit timestep {steps[-1]}, past the schedule's last "
            f"({num_ddpm_timesteps - 1}); the nearest step counts that fit are {sorted(near)}"
        )
    return steps


def make_ddim_sampling_parameters(alphas_cumprod: torch.Tensor, timesteps: np.ndarray, eta: float):
    """Per-step alphas, previous alphas and sigmas of DDIM (sigmas vanish for eta = 0)."""
    alphacums = alphas_cumprod.detach().cpu().double().numpy()
    alphas = alphacums[timesteps]
    alphas_prev = np.asarray([alphacums[0]] + alphacums[timesteps[:-1]].tolist())
    sigmas = eta * np.sqrt((1 - alphas_prev) / (1 - alphas) * (1 - alphas / alphas_prev))
    return sigmas, alphas, alphas_prev


class DDIMSchedule:
    """DDIM/PLMS per-step constants, made once on the model's device (no copies in the loop).

    Indexing a device tensor with a Python int yields a device scalar: no host round trip.
    """

    def __init__(self, model, num_steps: int, eta: float = 0.0, discretize: str = "uniform"):
        self.timesteps = make_ddim_timesteps(discretize, num_steps, model.num_timesteps)
        sigmas, alphas, alphas_prev = make_ddim_sampling_parameters(model.alphas_cumprod, self.timesteps, eta)
        device = model.device

        def dev(a) -> torch.Tensor:
            return torch.as_tensor(np.asarray(a, dtype=np.float32)).to(device)

        self.eta = eta
        self.alphas = dev(alphas)
        self.alphas_prev = dev(alphas_prev)
        self.sigmas = dev(sigmas)
        self.sqrt_one_minus_alphas = dev(np.sqrt(1.0 - np.asarray(alphas, dtype=np.float32)))
        self.timestep_tensor = torch.as_tensor(self.timesteps, dtype=torch.long).to(device)

    def __len__(self) -> int:
        return len(self.timesteps)

    def step(
        self, x: torch.Tensor, e_t: torch.Tensor, index: int, pred_x0: torch.Tensor | None = None,
        temperature: float = 1.0, noise_dropout: float = 0.0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One DDIM update from ``x`` at step ``index`` with noise estimate ``e_t``.

        Noise is drawn even when sigma is 0, as the original does, so that a seed's random
        stream (and so every later image of a run) matches it.
        """
        a_t, a_prev, sigma_t = self.alphas[index], self.alphas_prev[index], self.sigmas[index]
        if pred_x0 is None:
            pred_x0 = (x - self.sqrt_one_minus_alphas[index] * e_t) / a_t.sqrt()
        dir_xt = (1.0 - a_prev - sigma_t**2).sqrt() * e_t
        noise = sigma_t * torch.randn(x.shape, device=x.device) * temperature
        if noise_dropout > 0.0:
            noise = torch.nn.functional.dropout(noise, p=noise_dropout)
        return a_prev.sqrt() * pred_x0 + dir_xt + noise, pred_x0


@dataclass
class SampleRequest:
    """One batch's sampling, as a pipeline asks it of a :class:`Sampler`.

    ``noise`` is the run's standard-normal draw of ``shape`` (None: the sampler draws it as the
    original does, ``torch.randn(shape)`` on the model's device, first thing). Without ``init`` a run
    starts from that noise alone; with ``init`` (clean latents, img2img) from ``init`` noised by it.
    ``denoise_steps`` runs only the last that many steps of the schedule (img2img's strength; None:
    all of them). ``callback(i, latents)`` follows every step.
    """

    cond: Any
    uncond: Any
    scale: float
    steps: int
    shape: tuple[int, ...]
    eta: float | None = None
    schedule: str | None = None
    noise: torch.Tensor | None = None
    init: torch.Tensor | None = None
    denoise_steps: int | None = None
    callback: Callable[[int, torch.Tensor], None] | None = None


class Sampler:
    """The one sampler interface: what a pipeline asks of a sampler, none of it by name.

    A sampler says which schedules it runs on (the first is its default), whether it takes an eta
    (``default_eta`` None: it takes none, deterministic or, as DDPM and LCM, not), whether it can start part way down a schedule from a
    noised image (img2img, depth2img), how many steps and UNet calls a run takes, and runs a batch.
    """

    name: ClassVar[str]
    title: ClassVar[str]  # as AUTOMATIC1111 spells it
    schedules: ClassVar[tuple[str, ...]] = ("uniform",)
    default_eta: ClassVar[float | None] = None
    starts_midway: ClassVar[bool] = False
    calls_per_step: ClassVar[int] = 1  # UNet evaluations per step; 2: second order (the last step to 0 takes one)

    def check(self, eta: float | None, schedule: str) -> None:
        """ValueError, saying why, for an eta or schedule this sampler cannot run with (the step count
        is :meth:`run_steps`'s to check)."""
        if schedule not in self.schedules:
            raise ValueError(f"{self.title} runs on the {' or '.join(self.schedules)} schedule, not {schedule}")
        if self.default_eta is None and eta:
            raise ValueError(f"{self.title} takes no eta (DDIM, the ancestral and the SDE samplers do), got {eta}")

    def run_steps(self, steps: int, schedule: str, num_timesteps: int) -> int:
        """The steps (progress ticks) of a whole run of ``steps``; ValueError if it cannot be run."""
        from ldm.models.diffusion.schedules import schedule_named

        return schedule_named(schedule).check(steps, num_timesteps)

    def denoise_steps(self, steps: int, strength: float) -> int:
        """How many of the last steps a run started by ``strength`` in [0, 1] takes (img2img's rule)."""
        return min(int(strength * steps), steps)

    def unet_calls(self, run_steps: int) -> int:
        """UNet evaluations of a run of ``run_steps`` steps (a guided one batches cond and uncond in each)."""
        return self.calls_per_step * run_steps - (self.calls_per_step - 1) * (run_steps > 0)

    def sample(self, model, request: SampleRequest) -> torch.Tensor:
        """The batch's final latents."""
        raise NotImplementedError
