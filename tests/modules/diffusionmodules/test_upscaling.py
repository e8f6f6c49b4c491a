"""The noise augmentation of a conditioning input (the x4 upscaler's low-resolution image; the
base of unCLIP's embedding augmentation) against diffusers: the DDPMScheduler that
StableDiffusionUpscalePipeline uses as its ``low_res_scheduler`` (``add_noise``), and its
``squaredcos_cap_v2`` schedule (unCLIP's ``image_noising_scheduler``).

Tolerances: the noised images are compared with identical noise (the same seed drives our
``torch.randn_like`` and diffusers' generator) to 1e-5 relative: diffusers computes the schedule
in float32 (alphas_cumprod differ by up to 8e-7 relative from the original's float64-then-float32
values), and at level 0 its float32 ``1 - alphas_cumprod`` (1 - 0.9999) keeps only ~4 digits of
the noise coefficient: observed 1.4e-6 at level 0, under 3e-7 elsewhere. The schedules
themselves: linear within 1e-6, cosine within 5e-5 (float32 cumulative products drift where
alphas_cumprod is tiny; observed 1.3e-5); the cosine betas, computed in Python floats by both,
agree exactly once rounded to float32.
"""

from __future__ import annotations

import pytest
import torch

from conftest import rel_err
from ldm.modules.diffusionmodules.upscaling import ImageConcatWithNoiseAugmentation

X4_SCHEDULE = {"linear_start": 0.0001, "linear_end": 0.02}  # configs/stable-diffusion/x4-upscaling.yaml


def low_res_scheduler():
    """StableDiffusionUpscalePipeline's low_res_scheduler, as diffusers' single-file loader makes it."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="scaled_linear")


@pytest.fixture(scope="module")
def augmentation():
    return ImageConcatWithNoiseAugmentation(X4_SCHEDULE, max_noise_level=350)


@pytest.mark.parametrize("noise_level", [0, 20, 350, torch.tensor([7, 300])], ids=["0", "20", "350", "per-sample"])
def test_noised_image_matches_the_upscale_pipeline(augmentation, noise_level):
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    torch.manual_seed(5)
    ours, levels = augmentation(x, noise_level)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))  # the pipeline's draw
    expected_levels = torch.as_tensor(noise_level).expand(2)
    ref = low_res_scheduler().add_noise(x, noise, expected_levels)
    assert levels.dtype == torch.long and torch.equal(levels, expected_levels)
    assert rel_err(ours, ref) <= 1e-5


def test_schedules_match_diffusers(augmentation):
    from diffusers import DDPMScheduler

    assert rel_err(augmentation.alphas_cumprod, low_res_scheduler().alphas_cumprod) <= 1e-6
    cosine = ImageConcatWithNoiseAugmentation({"timesteps": 1000, "beta_schedule": "squaredcos_cap_v2"})
    ref = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    assert torch.equal(cosine.betas, ref.betas)
    assert ((cosine.alphas_cumprod - ref.alphas_cumprod).abs() / ref.alphas_cumprod).max() <= 5e-5


@pytest.mark.parametrize("noise_level", [-1, 351, torch.tensor([1, 2, 3])])
def test_noise_levels_outside_what_the_model_knows_are_refused(augmentation, noise_level):
    with pytest.raises(ValueError, match="between 0 and 350"):
        augmentation(torch.zeros(2, 3, 4, 4), noise_level)


def test_unknown_schedule_options_are_refused():
    with pytest.raises(TypeError, match="linear_stop"):
        ImageConcatWithNoiseAugmentation({"linear_stop": 0.02})
