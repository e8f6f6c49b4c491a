"""Small building blocks shared by the UNet and the diffusion wrapper."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint as _torch_checkpoint


def make_beta_schedule(
    schedule: str,
    n_timestep: int,
    linear_start: float = 1e-4,
    linear_end: float = 2e-2,
    cosine_s: float = 8e-3,
) -> np.ndarray:
    """Beta schedules of the original code, computed as it does (torch, float64, on the CPU)."""
    f64 = dict(dtype=torch.float64, device="cpu")
    if schedule == "linear":
        # "linear" is linear in sqrt(beta): SD's scaled-linear schedule.
        return (torch.linspace(linear_start**0.5, linear_end**0.5, n_timestep, **f64) ** 2).numpy()
    if schedule == "cosine":
        steps = torch.arange(n_timestep + 1, **f64) / n_timestep + cosine_s
        alphas = torch.cos(steps / (1 + cosine_s) * np.pi / 2).pow(2)
        alphas = alphas / alphas[0]
        return np.clip((1 - alphas[1:] / alphas[:-1]).numpy(), 0, 0.999)
    if schedule == "squaredcos_cap_v2":
        # Karlo's (and so unCLIP's embedding noise) cosine schedule, from alpha_bar in Python floats.
        def alpha_bar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        steps = [(i / n_timestep, (i + 1) / n_timestep) for i in range(n_timestep)]
        return np.array([min(1 - alpha_bar(t2) / alpha_bar(t1), 0.999) for t1, t2 in steps])
    if schedule == "sqrt_linear":
        return torch.linspace(linear_start, linear_end, n_timestep, **f64).numpy()
    if schedule == "sqrt":
        return (torch.linspace(linear_start, linear_end, n_timestep, **f64) ** 0.5).numpy()
    raise ValueError(f"unknown beta schedule {schedule!r}")


def diffusion_schedule(betas: np.ndarray) -> dict[str, np.ndarray]:
    """The float64 constants of q(x_t | x_0) for ``betas``, under the original's buffer names."""
    alphas_cumprod = np.cumprod(1.0 - betas, axis=0)
    return {
        "betas": betas,
        "alphas_cumprod": alphas_cumprod,
        "alphas_cumprod_prev": np.append(1.0, alphas_cumprod[:-1]),
        "sqrt_alphas_cumprod": np.sqrt(alphas_cumprod),
        "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - alphas_cumprod),
        "log_one_minus_alphas_cumprod": np.log(1.0 - alphas_cumprod),
        "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod - 1),
    }


def ddpm_schedule(betas: np.ndarray) -> dict[str, np.ndarray]:
    """Every float64 constant of the DDPM schedule for ``betas``: :func:`diffusion_schedule`'s
    and those of the posterior q(x_{t-1} | x_t, x_0), under the original's buffer names."""
    schedule = diffusion_schedule(betas)
    alphas_cumprod, alphas_cumprod_prev = schedule["alphas_cumprod"], schedule["alphas_cumprod_prev"]
    posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
    schedule.update(
        posterior_variance=posterior_variance,
        posterior_log_variance_clipped=np.log(np.maximum(posterior_variance, 1e-20)),
        posterior_mean_coef1=betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
        posterior_mean_coef2=(1.0 - alphas_cumprod_prev) * np.sqrt(1.0 - betas) / (1.0 - alphas_cumprod),
    )
    return schedule


def register_schedule_buffers(module: nn.Module, arrays: dict[str, np.ndarray], persistent: bool = True) -> None:
    """Register ``arrays`` as float32 buffers explicitly on the CPU, so that a model built on
    ``meta`` still has its schedule (the checkpoint, when it holds them, overwrites them);
    ``persistent=False`` keeps them out of the state dict, for layouts whose files lack them."""
    for name, value in arrays.items():
        module.register_buffer(name, torch.tensor(value, dtype=torch.float32, device="cpu"), persistent=persistent)


def extract_into_tensor(a: torch.Tensor, t: torch.Tensor, x_shape: torch.Size) -> torch.Tensor:
    """``a[t]`` shaped to broadcast over a batch of tensors of ``x_shape``."""
    return a.gather(-1, t).reshape(t.shape[0], *((1,) * (len(x_shape) - 1)))


def q_sample(module: nn.Module, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
    """Diffuse ``x_start`` to step ``t`` with the schedule buffers of ``module``; the noise, when
    not given, is drawn as the original draws it (``torch.randn_like(x_start)``)."""
    noise = torch.randn_like(x_start) if noise is None else noise
    return (
        extract_into_tensor(module.sqrt_alphas_cumprod, t, x_start.shape) * x_start
        + extract_into_tensor(module.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * noise
    )


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
    """Sinusoidal embeddings [cos | sin] of (possibly fractional) timesteps, shape (N, dim)."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    )
    args = timesteps[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


def zero_module(module: nn.Module) -> nn.Module:
    """Zero a module's parameters (the original's initialisation of output layers)."""
    for p in module.parameters():
        p.detach().zero_()
    return module


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the input dtype, as the original UNet does."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).to(x.dtype)


def normalization(channels: int) -> nn.Module:
    return GroupNorm32(32, channels)


def checkpoint(function, inputs: tuple, enabled: bool):
    """Gradient checkpointing, applied only when gradients are being recorded.

    Inference (``torch.no_grad``) never pays for it, and it never wraps a compiled forward.
    """
    if enabled and torch.is_grad_enabled():
        return _torch_checkpoint(function, *inputs, use_reentrant=False)
    return function(*inputs)
