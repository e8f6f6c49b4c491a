"""The x4 upscaler (LatentUpscaleDiffusion) against diffusers' StableDiffusionUpscalePipeline run
on the same weights (its UNet and VAE converted by diffusers' single-file converter), the same
text embeddings, low-resolution images, starting latents and seed, with a DDIM scheduler
configured as the x4 model's schedule, classifier-free guidance 9 for 10 steps.

The pipeline draws the low-resolution noise from its generator and noises the image with its
``low_res_scheduler``; our ``upscale_conditioning`` draws it with ``torch.randn_like`` of a
channels-last tensor after the same seed, as the original's demo does (its image tensor keeps the
layout of the (h, w, 3) array it came from), so the pipeline is given that draw too. Tolerance: relative error (L2) of the final latents
<= 5e-4; the runs differ by float32 rounding only (diffusers' float32 schedules, its UNet's
operation order), amplified by guidance: observed ~6e-7.
"""

from __future__ import annotations

import pytest
import torch

from conftest import (
    diffusers_unet_twin,
    diffusers_vae_twin,
    guided_ddim,
    rel_err,
    tiny_x4_config,
)

SCALE, STEPS, NOISE_LEVEL = 9.0, 10, 20


@pytest.fixture(scope="module")
def inputs(tiny_x4_model) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        c = tiny_x4_model.get_learned_conditioning(["a sharp photograph of a fox", "a brick wall"])
        uc = tiny_x4_model.get_learned_conditioning(["", ""])
    low_res = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(3)) * 2 - 1
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    return {"c": c, "uc": uc, "low_res": low_res, "x_T": x_T}


def upscale_pipeline(model):
    from diffusers import DDIMScheduler, DDPMScheduler, StableDiffusionUpscalePipeline

    scheduler = DDIMScheduler(  # configs/stable-diffusion/x4-upscaling.yaml: "linear" is diffusers' scaled_linear
        num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading", prediction_type="v_prediction",
    )
    low_res_scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="scaled_linear"
    )
    pipe = StableDiffusionUpscalePipeline(
        vae=diffusers_vae_twin(tiny_x4_config(), model, 0.08333), text_encoder=None, tokenizer=None,
        unet=diffusers_unet_twin(tiny_x4_config(), model), low_res_scheduler=low_res_scheduler, scheduler=scheduler,
        max_noise_level=350,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def channels_last_normal(shape, generator=None, device=None, dtype=None, layout=None) -> torch.Tensor:
    """diffusers' ``randn_tensor``, drawing as ``randn_like`` of a channels-last tensor does."""
    return torch.empty(shape, device=device, dtype=dtype, memory_format=torch.channels_last).normal_(generator=generator)


def channels_last_draw(shape) -> torch.Tensor:
    """The noise ``upscale_conditioning`` draws for low-res images of ``shape`` from the global generator."""
    return torch.randn_like(torch.empty(shape, memory_format=torch.channels_last))


def upscaled_latents(pipe, inputs) -> torch.Tensor:
    """The pipeline's final latents for ``inputs`` (its low-res noise from generator seed 11,
    drawn as ours)."""
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_upscale as module

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(module, "randn_tensor", channels_last_normal)
        return pipe(
            image=inputs["low_res"], prompt_embeds=inputs["c"], negative_prompt_embeds=inputs["uc"],
            num_inference_steps=STEPS, guidance_scale=SCALE, noise_level=NOISE_LEVEL, latents=inputs["x_T"].clone(),
            generator=torch.Generator().manual_seed(11), output_type="latent",
        ).images


def test_guided_ddim_matches_the_diffusers_upscale_pipeline(tiny_x4_model, inputs):
    with torch.no_grad():
        ref = upscaled_latents(upscale_pipeline(tiny_x4_model), inputs)
        torch.manual_seed(11)
        cond, uncond = tiny_x4_model.upscale_conditioning(inputs["low_res"], NOISE_LEVEL, inputs["c"], inputs["uc"])
        ours = guided_ddim(tiny_x4_model, cond, uncond, inputs["x_T"], STEPS, SCALE)
    assert rel_err(ours, inputs["x_T"]) > 0.1, "sampling did nothing"
    assert rel_err(ours, ref) <= 5e-4


def test_a_k_sampler_matches_the_diffusers_upscale_pipeline_with_its_scheduler(tiny_x4_model, inputs):
    """DPM++ 2M through the sampler interface on the x4 model's own (v, 0.0001-0.02) schedule, trailing
    timesteps, against the pipeline with DPMSolverMultistepScheduler; diffusers starts from latents
    as given (variance preserving), as ours from the same draw."""
    from diffusers import DPMSolverMultistepScheduler

    from ldm.models.diffusion.samplers import SAMPLERS
    from ldm.models.diffusion.sampling import SampleRequest

    pipe = upscale_pipeline(tiny_x4_model)
    pipe.scheduler = DPMSolverMultistepScheduler(
        num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="scaled_linear",
        prediction_type="v_prediction", algorithm_type="dpmsolver++", solver_order=2, final_sigmas_type="zero",
        timestep_spacing="trailing",
    )
    with torch.no_grad():
        ref = upscaled_latents(pipe, inputs)
        torch.manual_seed(11)
        cond, uncond = tiny_x4_model.upscale_conditioning(inputs["low_res"], NOISE_LEVEL, inputs["c"], inputs["uc"])
        ours = SAMPLERS["dpmpp_2m"].sample(tiny_x4_model, SampleRequest(cond, uncond, SCALE, STEPS, (2, 4, 8, 8),
                                                                         schedule="trailing", noise=inputs["x_T"]))
    assert rel_err(ours, inputs["x_T"]) > 0.1, "sampling did nothing"
    assert rel_err(ours, ref) <= 5e-4


def test_conditioning_is_the_demos(tiny_x4_model, inputs):
    """c_concat = the image diffused to the level by the low-res schedule with the seed's first
    (channels-last) normal draw; c_adm = the levels (long); the unconditional dict differs only in
    the text."""
    low_scale = tiny_x4_model.low_scale_model
    with torch.no_grad():
        torch.manual_seed(0)
        cond, uncond = tiny_x4_model.upscale_conditioning(inputs["low_res"], NOISE_LEVEL, inputs["c"], inputs["uc"])
        torch.manual_seed(0)
        noise = channels_last_draw(inputs["low_res"].shape)
        torch.manual_seed(0)
        assert not torch.equal(noise, torch.randn_like(inputs["low_res"]))  # the layout changes the numbers
    expected = (low_scale.sqrt_alphas_cumprod[NOISE_LEVEL] * inputs["low_res"]
                + low_scale.sqrt_one_minus_alphas_cumprod[NOISE_LEVEL] * noise)
    assert torch.allclose(cond["c_concat"][0], expected, rtol=0, atol=1e-7)
    assert torch.equal(cond["c_adm"], torch.tensor([NOISE_LEVEL] * 2)) and cond["c_adm"].dtype == torch.long
    assert cond["c_crossattn"][0] is inputs["c"] and uncond["c_crossattn"][0] is inputs["uc"]
    assert uncond["c_concat"][0] is cond["c_concat"][0] and uncond["c_adm"] is cond["c_adm"]
    assert tiny_x4_model.upscale_conditioning(inputs["low_res"], NOISE_LEVEL, inputs["c"])[1] is None


def test_one_image_is_repeated_before_noising_and_draws_once(tiny_x4_model, inputs):
    one = inputs["low_res"][:1]
    with torch.no_grad():
        torch.manual_seed(2)
        single, _ = tiny_x4_model.upscale_conditioning(one, 5, inputs["c"])
        torch.manual_seed(2)
        repeated, _ = tiny_x4_model.upscale_conditioning(one.repeat(2, 1, 1, 1), 5, inputs["c"])
    assert torch.equal(single["c_concat"][0], repeated["c_concat"][0])
    torch.manual_seed(0)
    with torch.no_grad():
        tiny_x4_model.upscale_conditioning(one, 5, inputs["c"])
    after = torch.randn(1)
    torch.manual_seed(0)
    channels_last_draw((2, 3, 8, 8))
    assert torch.equal(after, torch.randn(1))  # one draw, for the repeated batch
    with pytest.raises(ValueError, match="3 low-resolution images for a batch of 2"):
        tiny_x4_model.upscale_conditioning(torch.zeros(3, 3, 8, 8), 5, inputs["c"])


def test_noise_level_beyond_training_is_refused(tiny_x4_model, inputs):
    with pytest.raises(ValueError, match="between 0 and 350"):
        tiny_x4_model.upscale_conditioning(inputs["low_res"], 351, inputs["c"])


def test_apply_model_needs_the_noise_level(tiny_x4_model, inputs):
    x = torch.zeros(2, 4, 8, 8)
    cond, _ = tiny_x4_model.upscale_conditioning(inputs["low_res"], 0, inputs["c"])
    with pytest.raises(ValueError, match="needs 'c_adm'"):
        tiny_x4_model.apply_model(x, torch.tensor([1, 2]), {k: v for k, v in cond.items() if k != "c_adm"})
