"""SD2 depth-to-image (LatentDepth2ImageDiffusion) against diffusers on the same random weights:
the depth conditioning against StableDiffusionDepth2ImgPipeline.prepare_depth_map (with a given
depth map, and end to end with the pipeline's own depth estimator: transformers' DPT-Hybrid
holding our MiDaS weights), and a 10-step guided DDIM img2img run (the original's
stochastic_encode + decode) against the pipeline at strength 1 (noise at timestep 901, then all
10 steps). The 5-channel UNet alone: test_openaimodel.py; MiDaS alone: tests/modules/midas/.

Tolerances (relative error, L2):
* conditioning from a given depth map: 1e-6, the same bicubic resize and formula (observed 0);
  through the depth estimators: 1e-5, float32 rounding of the two DPT implementations and of
  diffusers' [0, 1] input against ours in [-1, 1] (observed 0).
* DDIM: 1e-4, as test_ddim.py; observed ~6e-7.
"""

from __future__ import annotations

import pytest
import torch

from conftest import diffusers_unet_twin, diffusers_vae_twin, rel_err, sd2_ddim_scheduler, tiny_family_config
from ldm.models.diffusion.ddim import DDIMSampler

SCALE, STEPS, SEED = 9.0, 10, 42


@pytest.fixture(scope="module")
def model(tiny_depth_model):
    return tiny_depth_model


@pytest.fixture(scope="module")
def pipeline(model, transformers_dpt):
    from diffusers import StableDiffusionDepth2ImgPipeline
    from transformers import DPTImageProcessor

    config = tiny_family_config("depth")
    # The images given are already MiDaS-sized and in [0, 1]: only the normalisation remains.
    processor = DPTImageProcessor(do_resize=False, do_rescale=False, do_pad=False, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    pipe = StableDiffusionDepth2ImgPipeline(
        vae=diffusers_vae_twin(config, model), text_encoder=None, tokenizer=None,
        unet=diffusers_unet_twin(config, model), scheduler=sd2_ddim_scheduler("eps"),
        depth_estimator=transformers_dpt, feature_extractor=processor,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def inputs(model) -> dict[str, torch.Tensor]:
    """Images in [0, 1] (diffusers' convention; ours is 2x - 1), a depth map of another size,
    and the text contexts."""
    gen = torch.Generator().manual_seed(0)
    image01 = torch.rand(2, 3, 64, 64, generator=gen)
    with torch.no_grad():
        c = model.get_learned_conditioning(["a red cube on a wooden table", "a lighthouse at dusk"])
        uc = model.get_learned_conditioning(["", ""])
    return {"image01": image01, "image": image01 * 2 - 1, "depth": torch.rand(2, 40, 48, generator=gen) + 0.5,
            "c": c, "uc": uc}


def test_given_depth_map_matches_prepare_depth_map(model, pipeline, inputs):
    ours = model.depth_conditioning(inputs["image"], inputs["depth"])
    ref = pipeline.prepare_depth_map(inputs["image01"], inputs["depth"], 2, False, torch.float32, "cpu")
    assert ours.shape == ref.shape == (2, 1, 8, 8)
    assert rel_err(ours, ref) <= 1e-6
    # Normalised per sample: each spans exactly [-1, 1].
    assert ours.amin(dim=(1, 2, 3)).tolist() == [-1.0, -1.0] and ours.amax(dim=(1, 2, 3)).tolist() == [1.0, 1.0]
    assert torch.equal(model.depth_conditioning(inputs["image"], inputs["depth"][:, None]), ours)


@pytest.mark.filterwarnings("ignore:In CPU autocast")  # the pipeline asks for float32 autocast: a no-op
def test_midas_depth_matches_the_pipeline_estimator(model, pipeline, inputs):
    ours = model.depth_conditioning(inputs["image"])
    ref = pipeline.prepare_depth_map(list(inputs["image01"]), None, 2, False, torch.float32, torch.device("cpu"))
    assert ours.shape == ref.shape == (2, 1, 8, 8)
    assert ours.std() > 0.1
    assert rel_err(ours, ref) <= 1e-5


def test_midas_sees_the_image_at_its_own_resolution(model):
    """A 96-pixel image (12x12 latents) is resized to the tiny MiDaS's 64 pixels, and its depth to the latents."""
    image = torch.rand(1, 3, 96, 96, generator=torch.Generator().manual_seed(2)) * 2 - 1
    midas = model.depth_model
    depth = midas(midas.prepare(image))
    assert depth.shape == (1, 1, 64, 64)
    assert torch.equal(model.depth_conditioning(image), model.depth_conditioning(image, depth))
    assert model.depth_conditioning(image).shape == (1, 1, 12, 12)


def test_constant_depth_is_a_clear_error(model, inputs):
    with pytest.raises(ValueError, match="constant"):
        model.depth_conditioning(inputs["image"], torch.ones(2, 8, 8))


def test_guided_ddim_img2img_matches_the_diffusers_pipeline(model, pipeline, inputs):
    with torch.no_grad():
        ref = pipeline(
            prompt_embeds=inputs["c"], negative_prompt_embeds=inputs["uc"], image=inputs["image01"],
            depth_map=inputs["depth"], strength=1.0, num_inference_steps=STEPS, guidance_scale=SCALE,
            generator=torch.Generator().manual_seed(SEED), output_type="latent",
        ).images
        # The pipeline draws the image's posterior sample, then the noise: the same two draws here.
        torch.manual_seed(SEED)
        z = model.get_first_stage_encoding(model.encode_first_stage(inputs["image"]))
        noise = torch.randn_like(z)
        c_concat = model.depth_conditioning(inputs["image"], inputs["depth"])
        cond = {"c_concat": [c_concat], "c_crossattn": [inputs["c"]]}
        uncond = {"c_concat": [c_concat], "c_crossattn": [inputs["uc"]]}
        sampler = DDIMSampler(model)
        sampler.make_schedule(STEPS, ddim_eta=0.0, verbose=False)
        z_enc = sampler.stochastic_encode(z, torch.tensor([STEPS - 1] * 2), noise=noise)
        ours = sampler.decode(z_enc, cond, STEPS, unconditional_guidance_scale=SCALE, unconditional_conditioning=uncond)
    assert rel_err(ours, z_enc) > 0.1, "sampling did nothing"
    assert rel_err(ours, ref) <= 1e-4
