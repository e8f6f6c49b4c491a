"""Placeholder until the k-samplers branch lands."""
import torch


def sample_euler(denoiser, x, sigmas, *, callback=None):
    for i in range(len(sigmas) - 1):
        denoised = denoiser(x, sigmas[i])
        x = x + (x - denoised) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
        if callback:
            callback(i, x)
    return x


def _todo(*args, **kwargs):
    raise NotImplementedError


sample_euler_ancestral = sample_heun = sample_lms = sample_dpm_2 = sample_dpm_2_ancestral = _todo
sample_dpmpp_2s_ancestral = sample_dpmpp_2m = sample_dpmpp_sde = sample_dpmpp_2m_sde = sample_dpmpp_3m_sde = _todo
sample_unipc = sample_ddpm = sample_lcm = _todo
