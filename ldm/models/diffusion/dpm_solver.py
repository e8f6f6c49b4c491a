"""DPM-Solver++ (Lu et al. 2022): multistep, second order, data prediction, time-uniform steps,
with a first-order final step below 15 steps: the configuration the original SD2 wrapper ran.

The discrete DDPM schedule becomes a continuous one by piecewise-linear interpolation of
log(alpha) over t = (i + 1) / N, as in the reference implementation; every per-step
coefficient is computed once before the loop.
"""

from __future__ import annotations

from typing import Any

import torch
from tqdm.auto import tqdm

from ldm.models.diffusion.ddim import _step_callback, _unsupported
from ldm.models.diffusion.sampling import GuidedModel, SampleRequest, Sampler, eps_from_v


class DiscreteVPSchedule:
    """log(alpha_t), sigma_t and lambda_t of a discrete VP schedule at continuous t in (0, 1]."""

    def __init__(self, alphas_cumprod: torch.Tensor):
        self.log_alphas = 0.5 * torch.log(alphas_cumprod.detach().float().cpu())
        self.total_n = len(self.log_alphas)
        self.t_grid = torch.linspace(0.0, 1.0, self.total_n + 1)[1:]

    def marginal_log_mean_coeff(self, t: torch.Tensor) -> torch.Tensor:
        # Piecewise-linear through (t_grid, log_alphas), extrapolating the end segments.
        k = (torch.searchsorted(self.t_grid, t) - 1).clamp(0, self.total_n - 2)
        x0, x1 = self.t_grid[k], self.t_grid[k + 1]
        y0, y1 = self.log_alphas[k], self.log_alphas[k + 1]
        return y0 + (t - x0) * (y1 - y0) / (x1 - x0)

    def alpha_sigma_lambda(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        log_alpha = self.marginal_log_mean_coeff(t)
        sigma = torch.sqrt(1.0 - torch.exp(2.0 * log_alpha))
        return torch.exp(log_alpha), sigma, log_alpha - torch.log(sigma)

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        """The (fractional) DDPM timestep the network sees for continuous time ``t``."""
        return (t - 1.0 / self.total_n) * 1000.0


def dpm_solver_plan(schedule: DiscreteVPSchedule, steps: int, order: int = 2, lower_order_final: bool = True) -> dict[str, torch.Tensor]:
    """Per-step constants of multistep DPM-Solver++ on a time-uniform grid from t=1 to t=1/N.

    Step ``i`` (1..steps) moves from t[i-1] to t[i] with
    ``x = ratio[i] * x - coef[i] * m0 - 0.5 * coef[i] * inv_r[i] * (m0 - m1)``,
    ``inv_r`` being 0 for first-order steps (m0, m1: the newest and previous data predictions).
    """
    if order != 2:
        raise NotImplementedError("only order 2 is implemented (the SD2 configuration)")
    if steps < order:
        raise ValueError(f"multistep DPM-Solver of order {order} needs at least {order} steps, got {steps}")
    t = torch.linspace(1.0, 1.0 / schedule.total_n, steps + 1)
    alpha, sigma, lam = schedule.alpha_sigma_lambda(t)
    h = lam[1:] - lam[:-1]
    step_order = torch.full((steps,), order)
    step_order[0] = 1
    if lower_order_final and steps < 15:
        step_order[-1] = 1
    first = step_order == 1
    coef = torch.where(first, alpha[1:] * torch.expm1(-h), alpha[1:] * (torch.exp(-h) - 1.0))
    inv_r = torch.zeros(steps)
    inv_r[1:] = h[1:] / h[:-1]
    inv_r = torch.where(first, torch.zeros_like(inv_r), inv_r)
    pad = lambda a: torch.cat([a.new_zeros(1), a])  # index by step number
    return {
        "model_time": schedule.model_time(t),
        "alpha": alpha,
        "sigma": sigma,
        "ratio": pad(sigma[1:] / sigma[:-1]),
        "coef": pad(coef),
        "inv_r": pad(inv_r),
    }


class DPMSolverSampler:
    """``DPMSolverSampler(model, device=...)``; ``sample`` returns ``(samples, None)`` as the original."""

    def __init__(self, model, device: torch.device | str | None = None, **kwargs: Any):
        self.model = model
        self.device = torch.device(device) if device is not None else model.device
        self.noise_schedule = DiscreteVPSchedule(model.alphas_cumprod)

    @torch.no_grad()
    def sample(
        self, S: int, batch_size: int, shape, conditioning=None, callback=None, normals_sequence=None,
        img_callback=None, quantize_x0=False, eta=0.0, mask=None, x0=None, temperature=1.0, noise_dropout=0.0,
        score_corrector=None, corrector_kwargs=None, verbose=True, x_T=None, log_every_t=100,
        unconditional_guidance_scale=1.0, unconditional_conditioning=None, **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        _unsupported(quantize_x0=quantize_x0, score_corrector=score_corrector, mask=mask is not None,
                     normals_sequence=normals_sequence)
        device = self.model.device
        x = torch.randn((batch_size, *shape), device=device) if x_T is None else x_T
        plan = {k: v.to(device) for k, v in dpm_solver_plan(self.noise_schedule, S).items()}
        model_time = plan["model_time"].expand(x.shape[0], -1).t().contiguous()  # one row per grid point
        guided = GuidedModel(self.model, conditioning, unconditional_conditioning, unconditional_guidance_scale)

        def data_prediction(x: torch.Tensor, i: int) -> torch.Tensor:
            """x0 predicted at grid point ``i`` (DPM-Solver++ works on data predictions)."""
            out = guided(x, model_time[i])
            alpha, sigma = plan["alpha"][i], plan["sigma"][i]
            noise = eps_from_v(out, x, alpha, sigma) if self.model.parameterization == "v" else out
            return (x - sigma * noise) / alpha

        m_prev = m_cur = data_prediction(x, 0)
        for i in tqdm(range(1, S + 1), desc="DPM-Solver++", total=S):
            coef = plan["coef"][i]
            x = plan["ratio"][i] * x - coef * m_cur - 0.5 * coef * (plan["inv_r"][i] * (m_cur - m_prev))
            if i < S:
                m_prev, m_cur = m_cur, data_prediction(x, i)
            if callback:
                callback(i - 1)
            if img_callback:
                img_callback(x, i - 1)
        return x, None


class DPMSolver(Sampler):
    """The original SD2 DPM-Solver++ (2M) behind the sampler interface: its own time-uniform grid,
    from noise only (for DPM++ 2M on another schedule, or for img2img, see ``dpmpp_2m``)."""

    name = "dpm"
    title = "DPM-Solver++ (2M)"
    schedules = ("time_uniform",)

    def run_steps(self, steps: int, schedule: str, num_timesteps: int) -> int:
        if not 2 <= steps <= num_timesteps:
            raise ValueError(f"{self.title} takes 2 to {num_timesteps} steps, got {steps}")
        return steps

    def sample(self, model, request: SampleRequest) -> torch.Tensor:
        r = request
        samples, _ = DPMSolverSampler(model).sample(
            r.steps, r.shape[0], tuple(r.shape[1:]), conditioning=r.cond, x_T=r.noise,
            unconditional_guidance_scale=r.scale, unconditional_conditioning=r.uncond, verbose=False,
            img_callback=_step_callback(r),
        )
        return samples
