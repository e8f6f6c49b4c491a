"""SD2 inpainting (LatentInpaintDiffusion) against diffusers on the same random weights: the
conditioning against StableDiffusionInpaintPipeline.prepare_mask_latents (same posterior noise),
and a 10-step guided DDIM sample against the pipeline itself (SD2's DDIMScheduler, guidance 9,
the same x_T and text embeddings). The 9-channel UNet alone: test_openaimodel.py.

Tolerances (relative error, L2):
* mask: exact (both binarise at 0.5 and resize by nearest neighbour); masked-image latent: 1e-5,
  float32 rounding of the two VAE encoders (observed ~3e-7).
* DDIM: 1e-4, as tests/models/diffusion/test_ddim.py (schedules in float32 vs float64-then-float32,
  guidance at 9 amplifying rounding); observed ~6e-7.
"""

from __future__ import annotations

import pytest
import torch

from conftest import (
    assert_draws_normals, diffusers_unet_twin, diffusers_vae_twin, rel_err, sd2_ddim_scheduler, tiny_family_config,
)
from ldm.loading import build_model
from ldm.models.diffusion.ddim import DDIMSampler

SCALE, STEPS, SEED = 9.0, 10, 42


@pytest.fixture(scope="module")
def model(tiny_inpaint_model):
    return tiny_inpaint_model


@pytest.fixture(scope="module")
def pipeline(model):
    from diffusers import StableDiffusionInpaintPipeline

    config = tiny_family_config("inpainting")
    pipe = StableDiffusionInpaintPipeline(
        vae=diffusers_vae_twin(config, model), text_encoder=None, tokenizer=None,
        unet=diffusers_unet_twin(config, model), scheduler=sd2_ddim_scheduler("eps"),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def inputs(model) -> dict[str, torch.Tensor]:
    """Images in [0, 1] (diffusers' convention; ours is 2x - 1), masks in [0, 1] with some pixels
    exactly at the 0.5 threshold, x_T and the text contexts."""
    gen = torch.Generator().manual_seed(0)
    image01 = torch.rand(2, 3, 64, 64, generator=gen)
    mask = torch.rand(2, 1, 64, 64, generator=gen)
    mask[:, :, ::7, ::5] = 0.5
    with torch.no_grad():
        c = model.get_learned_conditioning(["a red cube on a wooden table", "a lighthouse at dusk"])
        uc = model.get_learned_conditioning(["", ""])
    return {"image01": image01, "image": image01 * 2 - 1, "mask": mask, "x_T": torch.randn(2, 4, 8, 8, generator=gen),
            "c": c, "uc": uc}


def test_conditioning_matches_prepare_mask_latents(model, pipeline, inputs):
    with torch.no_grad():
        torch.manual_seed(SEED)
        ours = model.inpaint_conditioning(inputs["image"], inputs["mask"])
        mask = pipeline.mask_processor.preprocess(inputs["mask"], height=64, width=64)
        image = pipeline.image_processor.preprocess(inputs["image01"], height=64, width=64)
        ref_mask, ref_latent = pipeline.prepare_mask_latents(
            mask, image * (mask < 0.5), 2, 64, 64, torch.float32, "cpu", torch.Generator().manual_seed(SEED), False
        )
    assert ours.shape == (2, 5, 8, 8)
    assert torch.equal(ours[:, :1], ref_mask) and set(ref_mask.unique().tolist()) == {0.0, 1.0}
    assert rel_err(ours[:, 1:], ref_latent) <= 1e-5


def test_masked_latent_is_a_posterior_sample_drawn_as_the_original(model, inputs):
    """One normal draw of the latent's shape from the global generator: a seeded run's later
    draws (x_T, DDIM noise) are the original's."""
    assert_draws_normals(lambda: model.inpaint_conditioning(inputs["image"], inputs["mask"]), 1, shape=(2, 4, 8, 8))


def test_guided_ddim_matches_the_diffusers_pipeline(model, pipeline, inputs):
    with torch.no_grad():
        ref = pipeline(
            prompt_embeds=inputs["c"], negative_prompt_embeds=inputs["uc"], image=inputs["image01"],
            mask_image=inputs["mask"], height=64, width=64, strength=1.0, num_inference_steps=STEPS,
            guidance_scale=SCALE, eta=0.0, latents=inputs["x_T"].clone(), generator=torch.Generator().manual_seed(SEED),
            output_type="latent",
        ).images
        torch.manual_seed(SEED)
        c_concat = model.inpaint_conditioning(inputs["image"], inputs["mask"])
        cond = {"c_concat": [c_concat], "c_crossattn": [inputs["c"]]}
        uncond = {"c_concat": [c_concat], "c_crossattn": [inputs["uc"]]}
        ours, _ = DDIMSampler(model).sample(
            STEPS, 2, (4, 8, 8), conditioning=cond, unconditional_conditioning=uncond,
            unconditional_guidance_scale=SCALE, eta=0.0, x_T=inputs["x_T"].clone(), verbose=False,
        )
    assert not torch.allclose(ours, inputs["x_T"], atol=0.1), "sampling did nothing"
    assert rel_err(ours, ref) <= 1e-4


def test_a_k_sampler_matches_the_diffusers_pipeline_with_its_scheduler(model, pipeline, inputs):
    """Euler on the Karras schedule through the sampler interface, against the inpainting pipeline with
    EulerDiscreteScheduler(use_karras_sigmas=True); its start is latents * sigma_max, ours
    x_T * sqrt(1 + sigma_max^2): it is given x_T * sqrt(1 + sigma_max^2) / sigma_max."""
    import math

    from diffusers import EulerDiscreteScheduler

    from ldm.models.diffusion.samplers import SAMPLERS
    from ldm.models.diffusion.sampling import SampleRequest

    scheduler = EulerDiscreteScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                       beta_schedule="scaled_linear", use_karras_sigmas=True)
    sigma_max = scheduler.sigmas.max().item()
    pipe = type(pipeline)(**{**pipeline.components, "scheduler": scheduler})
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        ref = pipe(
            prompt_embeds=inputs["c"], negative_prompt_embeds=inputs["uc"], image=inputs["image01"],
            mask_image=inputs["mask"], height=64, width=64, strength=1.0, num_inference_steps=STEPS,
            guidance_scale=SCALE, latents=inputs["x_T"] * (math.sqrt(1 + sigma_max**2) / sigma_max),
            generator=torch.Generator().manual_seed(SEED), output_type="latent",
        ).images
        torch.manual_seed(SEED)
        c_concat = model.inpaint_conditioning(inputs["image"], inputs["mask"])
        cond = {"c_concat": [c_concat], "c_crossattn": [inputs["c"]]}
        uncond = {"c_concat": [c_concat], "c_crossattn": [inputs["uc"]]}
        ours = SAMPLERS["euler"].sample(model, SampleRequest(cond, uncond, SCALE, STEPS, (2, 4, 8, 8), schedule="karras",
                                                             noise=inputs["x_T"]))
    assert rel_err(ours, ref) <= 1e-4


def test_concat_keys_must_name_mask_and_masked_image():
    config = tiny_family_config("inpainting")
    config.model.params.concat_keys = ["mask", "image"]
    with pytest.raises(ValueError, match="masked_image"):
        build_model(config, "meta")
