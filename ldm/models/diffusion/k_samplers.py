"""The k-diffusion samplers (Karras et al. 2022 and the DPM-Solver family), as small pure functions.

Every function is ``sample_*(denoiser, x, sigmas, *, callback=None, ...) -> latents`` in the
variance-exploding form: ``x = x0 + sigma * noise``, ``denoiser(x, sigma)`` predicting x0 (see
:class:`~ldm.models.diffusion.denoiser.Denoiser`), ``sigmas`` descending, usually ending with 0.
``callback(i, x)`` follows step i.

The sigmas are Python floats: every branch (``if sigma_next == 0``) and coefficient is computed on
the host, so a loop never waits for the device. The stochastic samplers take ``eta`` (the share of
the step's noise drawn anew; 0 makes the ancestral ones deterministic) and a
``noise_sampler(sigma, sigma_next)``, by default a standard-normal draw of the latents' shape from
PyTorch's global generator, which a run seeds: reproducible, and not k-diffusion's Brownian tree for
the SDE samplers (whose draws over sub-intervals of one path are correlated), so their images
differ from k-diffusion's and AUTOMATIC1111's for the same seed.

The formulas follow k-diffusion's ``sampling.py`` (and diffusers' ``UniPCMultistepScheduler`` for
UniPC, ComfyUI's DDPM and LCM samplers); the tests compare each with diffusers' schedulers.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch

Denoise = Callable[[torch.Tensor, float], torch.Tensor]
Callback = Callable[[int, torch.Tensor], None] | None
NoiseSampler = Callable[[float, float], torch.Tensor]


def _noise_sampler(x: torch.Tensor, noise_sampler: NoiseSampler | None) -> NoiseSampler:
    return noise_sampler if noise_sampler is not None else (lambda sigma, sigma_next: torch.randn_like(x))


def ancestral_step(sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float]:
    """(sigma_down, sigma_up): the deterministic step's target and the fresh noise's level, with
    sigma_down^2 + sigma_up^2 = sigma_next^2 (eta 1: the DDPM posterior's variance)."""
    if not eta or sigma_next == 0:
        return sigma_next, 0.0
    up = min(sigma_next, eta * math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2))
    return math.sqrt(sigma_next**2 - up**2), up


def _step_done(callback: Callback, i: int, x: torch.Tensor) -> torch.Tensor:
    if callback is not None:
        callback(i, x)
    return x


def _log_midpoint(a: float, b: float) -> float:
    return math.exp((math.log(a) + math.log(b)) / 2)


# One deterministic step of a method from ``sigma`` to ``target`` (the ODE samplers step to the next
# sigma, their ancestral twins to sigma_down). Each ends with Euler's step when the target is 0.
Step = Callable[[Denoise, torch.Tensor, float, float], torch.Tensor]


def euler_step(denoiser: Denoise, x: torch.Tensor, sigma: float, target: float) -> torch.Tensor:
    return x + (x - denoiser(x, sigma)) / sigma * (target - sigma)


def heun_step(denoiser: Denoise, x: torch.Tensor, sigma: float, target: float) -> torch.Tensor:
    d = (x - denoiser(x, sigma)) / sigma
    x_2 = x + d * (target - sigma)
    if target == 0:
        return x_2
    d_2 = (x_2 - denoiser(x_2, target)) / target
    return x + (d + d_2) * ((target - sigma) / 2)


def dpm_2_step(denoiser: Denoise, x: torch.Tensor, sigma: float, target: float) -> torch.Tensor:
    d = (x - denoiser(x, sigma)) / sigma
    if target == 0:
        return x + d * (target - sigma)
    sigma_mid = _log_midpoint(sigma, target)
    x_2 = x + d * (sigma_mid - sigma)
    return x + (x_2 - denoiser(x_2, sigma_mid)) / sigma_mid * (target - sigma)


def dpmpp_2s_step(denoiser: Denoise, x: torch.Tensor, sigma: float, target: float) -> torch.Tensor:
    denoised = denoiser(x, sigma)
    if target == 0:
        return denoised
    h = math.log(sigma / target)  # lambda = -log sigma
    sigma_mid = sigma * math.exp(-h / 2)
    x_2 = (sigma_mid / sigma) * x - math.expm1(-h / 2) * denoised
    return (target / sigma) * x - math.expm1(-h) * denoiser(x_2, sigma_mid)


def _ode(step: Step, denoiser: Denoise, x: torch.Tensor, sigmas: Sequence[float], callback: Callback) -> torch.Tensor:
    for i, (sigma, sigma_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        x = _step_done(callback, i, step(denoiser, x, sigma, sigma_next))
    return x


def _ancestral(step: Step, denoiser: Denoise, x: torch.Tensor, sigmas: Sequence[float], eta: float, s_noise: float,
               noise_sampler: NoiseSampler | None, callback: Callback) -> torch.Tensor:
    """``step`` down to sigma_down, then fresh noise up to sigma_next, at every step."""
    noise = _noise_sampler(x, noise_sampler)
    for i, (sigma, sigma_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        down, up = ancestral_step(sigma, sigma_next, eta)
        x = step(denoiser, x, sigma, down)
        if sigma_next > 0:
            x = x + noise(sigma, sigma_next) * (s_noise * up)
        _step_done(callback, i, x)
    return x


@torch.no_grad()
def sample_euler(denoiser: Denoise, x: torch.Tensor, sigmas: Sequence[float], *, callback: Callback = None) -> torch.Tensor:
    """Euler's method on the probability-flow ODE dx/dsigma = (x - x0) / sigma (Karras et al., Alg. 2 without churn)."""
    return _ode(euler_step, denoiser, x, sigmas, callback)


@torch.no_grad()
def sample_euler_ancestral(denoiser: Denoise, x: torch.Tensor, sigmas: Sequence[float], *, eta: float = 1.0,
                           s_noise: float = 1.0, noise_sampler: NoiseSampler | None = None,
                           callback: Callback = None) -> torch.Tensor:
    """An Euler step down to sigma_down, then fresh noise up to sigma_next ("Euler a")."""
    return _ancestral(euler_step, denoiser, x, sigmas, eta, s_noise, noise_sampler, callback)


@torch.no_grad()
def sample_heun(denoiser: Denoise, x: torch.Tensor, sigmas: Sequence[float], *, callback: Callback = None) -> torch.Tensor:
    """Heun's second-order method (Karras et al., Alg. 2 without churn); the last step to 0 is Euler's."""
    return _ode(heun_step, denoiser, x, sigmas, callback)


@torch.no_grad()
def sample_dpm_2(denoiser: Denoise, x: torch.Tensor, sigmas: Sequence[float], *, callback: Callback = None) -> torch.Tensor:
    """DPM-Solver-2 in sigma: the derivative at the log-midpoint sigma drives the whole step ("DPM2")."""
    return _ode(dpm_2_step, denoiser, x, sigmas, callback)


@torch.no_grad()
def sample_dpm_2_ancestral(denoiser: Denoise, x: torch.Tensor, sigmas: Sequence[float], *, eta: float = 1.0,
                           s_noise: float = 1.0, noise_sampler: NoiseSampler | None = None,
                           callback: Callback = None) -> torch.Tensor:
    """A DPM-Solver-2 step down to sigma_down, then fresh noise up to sigma_next ("DPM2 a")."""
    return _ancestral(dpm_2_step, denoiser, x, sigmas, eta, s_noise, noise_sampler, callback)


@torch.no_grad()
def sample_dpmpp_2s_ancestral(denoiser: Denoise, x: torch.Tensor, sigmas: Sequence[float], *, eta: float = 1.0,
                              s_noise: float = 1.0, noise_sampler: NoiseSampler | None = None,
                              callback: Callback = None) -> torch.Tensor:
    """DPM-Solver++(2S), single-step second order through the log-midpoint, to sigma_down; then fresh
    noise up to sigma_next ("DPM++ 2S a")."""
    return _ancestral(dpmpp_2s_step, denoiser, x, sigmas, eta, s_noise, noise_sampler, callback)


def lms_coefficients(sigmas: Sequence[float], i: int, order: int) -> list[float]:
    """The linear multistep weights of the last ``order`` derivatives for the step from sigmas[i]:
    the integrals over [sigmas[i], sigmas[i + 1]] of the Lagrange basis on sigmas[i], sigmas[i - 1], ...
    (exact: the basis polynomials are integrated as polynomials)."""
    nodes = [sigmas[i - k] for k in range(order)]
    weights = []
    for j, node in enumerate(nodes):
        basis = np.poly1d([1.0])
        for k, other in enumerate(nodes):
            if k != j:
                basis *= np.poly1d([1.0, -other]) / (node - other)
        integral = basis.integ()
        weights.append(float(integral(sigmas[i + 1]) - integral(sigmas[i])))
    return weights


@torch.no_grad()
def sample_lms(denoiser: Denoise, x: torch.Tensor, sigmas: Sequence[float], *, order: int = 4,
               callback: Callback = None) -> torch.Tensor:
    """Linear multistep (Adams-Bashforth in sigma) on the last ``order`` derivatives ("LMS")."""
    derivatives: list[torch.Tensor] = []
    for i, sigma in enumerate(sigmas[:-1]):
        derivatives = [*derivatives, (x - denoiser(x, sigma)) / sigma][-order:]
        weights = lms_coefficients(sigmas, i, len(derivatives))
        x = x + sum(w * d for w, d in zip(weights, reversed(derivatives)))
        _step_done(callback, i, x)
    return x


@torch.no_grad()
def sample_dpmpp_sde(denoiser: Denoise, x: torch.Tensor, sigmas: Sequence[float], *, eta: float = 1.0,
                     s_noise: float = 1.0, r: float = 0.5, noise_sampler: NoiseSampler | None = None,
                     callback: Callback = None) -> torch.Tensor:
    """Stochastic DPM-Solver++, second order: an ancestral sub-step to lambda + r h, then the step
    from both data predictions ("DPM++ SDE"); the last step to 0 is Euler's."""
    noise = _noise_sampler(x, noise_sampler)
    for i, (sigma, sigma_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        denoised = denoiser(x, sigma)
        if sigma_next == 0:
            x = denoised
        else:
            h = math.log(sigma / sigma_next)
            sigma_s = sigma * math.exp(-r * h)
            down, up = ancestral_step(sigma, sigma_s, eta)
            x_2 = (down / sigma) * x - math.expm1(-math.log(sigma / down)) * denoised
            x_2 = x_2 + noise(sigma, sigma_s) * (s_noise * up)
            denoised_2 = denoiser(x_2, sigma_s)
            down, up = ancestral_step(sigma, sigma_next, eta)
            fac = 1 / (2 * r)
            denoised_d = (1 - fac) * denoised + fac * denoised_2
            x = (down / sigma) * x - math.expm1(-math.log(sigma / down)) * denoised_d
            x = x + noise(sigma, sigma_next) * (s_noise * up)
        _step_done(callback, i, x)
    return x


@torch.no_grad()
def sample_dpmpp_2m(denoiser: Denoise, x: torch.Tensor, sigmas: Sequence[float], *, callback: Callback = None) -> torch.Tensor:
    """DPM-Solver++(2M): multistep second order on data predictions (Lu et al. 2022) ("DPM++ 2M")."""
    previous = None
    for i, (sigma, sigma_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        denoised = denoiser(x, sigma)
        if sigma_next == 0:
            x = denoised
        else:
            h = math.log(sigma / sigma_next)
            estimate = denoised
            if previous is not None:
                r = math.log(sigmas[i - 1] / sigma) / h
                estimate = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * previous
            x = (sigma_next / sigma) * x - math.expm1(-h) * estimate
        previous = denoised
        _step_done(callback, i, x)
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(denoiser: Denoise, x: torch.Tensor, sigmas: Sequence[float], *, eta: float = 1.0,
                        s_noise: float = 1.0, solver_type: str = "midpoint", noise_sampler: NoiseSampler | None = None,
                        callback: Callback = None) -> torch.Tensor:
    """SDE-DPM-Solver++(2M) (Lu et al. 2022), ``solver_type`` "midpoint" or "heun" ("DPM++ 2M SDE")."""
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"solver_type must be 'midpoint' or 'heun', got {solver_type!r}")
    noise = _noise_sampler(x, noise_sampler)
    previous, h_last = None, None
    for i, (sigma, sigma_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        denoised = denoiser(x, sigma)
        if sigma_next == 0:
            x = denoised
        else:
            h = math.log(sigma / sigma_next)
            eta_h = eta * h
            phi = -math.expm1(-h - eta_h)
            x = (sigma_next / sigma) * math.exp(-eta_h) * x + phi * denoised
            if previous is not None:
                r = h_last / h
                weight = 0.5 * phi if solver_type == "midpoint" else 1 - phi / (h + eta_h)
                x = x + (weight / r) * (denoised - previous)
            if eta:
                x = x + noise(sigma, sigma_next) * (sigma_next * math.sqrt(-math.expm1(-2 * eta_h)) * s_noise)
            h_last = h
        previous = denoised
        _step_done(callback, i, x)
    return x


@torch.no_grad()
def sample_dpmpp_3m_sde(denoiser: Denoise, x: torch.Tensor, sigmas: Sequence[float], *, eta: float = 1.0,
                        s_noise: float = 1.0, noise_sampler: NoiseSampler | None = None,
                        callback: Callback = None) -> torch.Tensor:
    """SDE-DPM-Solver++(3M): multistep third order ("DPM++ 3M SDE")."""
    noise = _noise_sampler(x, noise_sampler)
    denoised_1 = denoised_2 = None
    h_1 = h_2 = None
    for i, (sigma, sigma_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        denoised = denoiser(x, sigma)
        if sigma_next == 0:
            x = denoised
        else:
            h = math.log(sigma / sigma_next)
            h_eta = h * (eta + 1)
            x = math.exp(-h_eta) * x - math.expm1(-h_eta) * denoised
            phi_2 = math.expm1(-h_eta) / h_eta + 1
            if h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0 = (denoised - denoised_1) / r0
                d1_1 = (denoised_1 - denoised_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * (r0 / (r0 + r1))
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_3 = phi_2 / h_eta - 0.5
                x = x + phi_2 * d1 - phi_3 * d2
            elif h_1 is not None:
                x = x + phi_2 * ((denoised - denoised_1) / (h_1 / h))
            if eta:
                x = x + noise(sigma, sigma_next) * (sigma_next * math.sqrt(-math.expm1(-2 * h * eta)) * s_noise)
        denoised_1, denoised_2 = denoised, denoised_1
        h_1, h_2 = (h if sigma_next else None), h_1
        _step_done(callback, i, x)
    return x


def _unipc_coefficients(h: float, rks: list[float], order: int, variant: str, corrector: bool) -> tuple[float, float, list[float]]:
    """UniPC's (h phi_1, B(h), rhos) for a step of log-SNR length ``h`` with earlier outputs at the
    relative positions ``rks`` (Zhao et al. 2023, data prediction; B(h) = h for bh1, e^h - 1 for bh2)."""
    hh = -h
    h_phi_1 = math.expm1(hh)
    b_h = hh if variant == "bh1" else math.expm1(hh)
    h_phi_k, factorial = h_phi_1 / hh - 1, 1
    nodes = [*rks, 1.0]
    rows, b = [], []
    for k in range(1, order + 1):
        rows.append([r ** (k - 1) for r in nodes])
        b.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    if corrector:
        rhos = [0.5] if order == 1 else list(np.linalg.solve(np.array(rows), np.array(b)))
    elif order == 1:
        rhos = []
    else:
        rhos = [0.5] if order == 2 else list(np.linalg.solve(np.array(rows)[:-1, :-1], np.array(b)[:-1]))
    return h_phi_1, b_h, [float(r) for r in rhos]


def _unipc_update(x: torch.Tensor, lambdas: list[float], outputs: list[torch.Tensor], lambda_t: float, sigma_ratio: float,
                  order: int, variant: str, model_t: torch.Tensor | None = None) -> torch.Tensor:
    """One UniP step (``model_t`` None) or UniC correction from ``x`` at lambdas[-1] to lambda_t, on
    the newest ``order`` data predictions ``outputs`` (newest last, at ``lambdas``)."""
    m0, h = outputs[-1], lambda_t - lambdas[-1]
    rks = [(lambdas[-1 - k] - lambdas[-1]) / h for k in range(1, order)]
    differences = [(outputs[-1 - k] - m0) / rk for k, rk in enumerate(rks, start=1)]
    h_phi_1, b_h, rhos = _unipc_coefficients(h, rks, order, variant, corrector=model_t is not None)
    x_t = sigma_ratio * x - h_phi_1 * m0
    residual = sum(rho * d for rho, d in zip(rhos, differences))
    if model_t is not None:
        residual = residual + rhos[-1] * (model_t - m0)
    return x_t - b_h * residual if isinstance(residual, torch.Tensor) else x_t


@torch.no_grad()
def sample_unipc(denoiser: Denoise, x: torch.Tensor, sigmas: Sequence[float], *, order: int = 2, variant: str = "bh2",
                 callback: Callback = None) -> torch.Tensor:
    """UniPC (Zhao et al. 2023): the multistep predictor UniP of ``order`` and, once the model has seen
    the predicted point, the corrector UniC (no extra UNet call), as diffusers' UniPCMultistepScheduler:
    data prediction, lower orders in the first steps and the last (``lower_order_final``)."""
    if variant not in ("bh1", "bh2"):
        raise ValueError(f"variant must be 'bh1' or 'bh2', got {variant!r}")
    if not 1 <= order <= 3:
        raise ValueError(f"order must be 1, 2 or 3, got {order}")
    n = len(sigmas) - 1
    outputs: list[torch.Tensor] = []
    lambdas: list[float] = []
    x_last, last_order = x, 0
    for i, (sigma, sigma_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        model_t = denoiser(x, sigma)
        lambda_i = -math.log(sigma)
        if outputs:  # correct x, reached by the last predictor step, with what the model says there
            x = _unipc_update(x_last, lambdas, outputs, lambda_i, sigma / sigmas[i - 1], last_order, variant, model_t)
        outputs, lambdas = [*outputs, model_t][-order:], [*lambdas, lambda_i][-order:]
        last_order = min(order, n - i, len(outputs))
        x_last = x
        if sigma_next == 0:
            x = model_t
        else:
            x = _unipc_update(x, lambdas, outputs, -math.log(sigma_next), sigma_next / sigma, last_order, variant)
        _step_done(callback, i, x)
    return x


@torch.no_grad()
def sample_ddpm(denoiser: Denoise, x: torch.Tensor, sigmas: Sequence[float], *, noise_sampler: NoiseSampler | None = None,
                callback: Callback = None) -> torch.Tensor:
    """Ancestral DDPM steps (Ho et al. 2020): the mean of q(x_next | x, x0) and its fixed-small variance,
    between the schedule's noise levels."""
    noise = _noise_sampler(x, noise_sampler)
    for i, (sigma, sigma_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        denoised = denoiser(x, sigma)
        if sigma_next == 0:
            x = denoised
        else:
            alpha_bar, alpha_bar_next = 1 / (1 + sigma**2), 1 / (1 + sigma_next**2)
            alpha = alpha_bar / alpha_bar_next
            eps = (x - denoised) / sigma
            x_vp = x * math.sqrt(alpha_bar)
            mean = (x_vp - (1 - alpha) / math.sqrt(1 - alpha_bar) * eps) / math.sqrt(alpha)
            std = math.sqrt((1 - alpha) * (1 - alpha_bar_next) / (1 - alpha_bar))
            x = (mean + std * noise(sigma, sigma_next)) / math.sqrt(alpha_bar_next)
        _step_done(callback, i, x)
    return x


@torch.no_grad()
def sample_lcm(denoiser: Denoise, x: torch.Tensor, sigmas: Sequence[float], *, noise_sampler: NoiseSampler | None = None,
               callback: Callback = None) -> torch.Tensor:
    """Latent-consistency sampling (Luo et al. 2023): jump to the prediction, then noise it afresh to
    the next level ("LCM"; for distilled models: LCM, SD-Turbo)."""
    noise = _noise_sampler(x, noise_sampler)
    for i, (sigma, sigma_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        x = denoiser(x, sigma)
        if sigma_next > 0:
            x = x + noise(sigma, sigma_next) * sigma_next
        _step_done(callback, i, x)
    return x
