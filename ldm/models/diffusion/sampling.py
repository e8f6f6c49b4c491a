"""What the DDIM, PLMS and DPM-Solver samplers share: the guided model call and the DDIM
timestep schedule, computed as the original code computes them."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def concat_conditioning(uncond: Any, cond: Any) -> Any:
    """Stack unconditional and conditional inputs (tensors, lists or dicts of them) into one batch."""
    if isinstance(cond, dict):
        return {k: concat_conditioning(uncond[k], cond[k]) for k in cond}
    if isinstance(cond, list):
        return [torch.cat([u, c]) for u, c in zip(uncond, cond)]
    return torch.cat([uncond, cond])


class GuidedModel:
    """The model under classifier-free guidance, as a function of (x, t).

    Unconditional and conditional inputs run as one batched UNet call (uncond first, as the
    original); their conditioning batch is built once here, not at every step.
    """

    def __init__(self, model, cond: Any, uncond: Any = None, scale: float = 1.0):
        self.model = model
        self.scale = scale
        self.guided = uncond is not None and scale != 1.0
        self.cond = concat_conditioning(uncond, cond) if self.guided else cond

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
