"""The original ldm API that notebooks, tools and the original demos call on the model classes:
``get_input`` (a data batch to latents and conditioning, per family), ``get_unconditional_conditioning``,
``low_scale_model(x)`` / ``q_sample``, ``LatentUpscaleFinetuneDiffusion``, ``AddMiDaS`` and DDIM's
``ucg_schedule``, against independent implementations on the same random weights:
diffusers' AutoencoderKL, StableDiffusionInpaintPipeline.prepare_mask_latents, DDPMScheduler.add_noise
and DDIMScheduler, transformers' DPT, and the formulas of the original's training code.

Tolerances: the latents of two VAE encoders agree to float32 rounding (relative L2 1e-5, observed
~3e-7); diffusers' noise schedules are float32 cumulative products, ours float64 rounded to float32:
noised images agree to 2e-5 absolute (observed ~1e-5 at level 349, less below); the
DDIM runs to 1e-4 relative, as tests/models/diffusion/test_ddim.py. Same-code paths are exact.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import diffusers_vae_twin, rel_err, sd2_ddim_scheduler, tiny_config, tiny_family_config, tiny_x4_config
from ldm.data.util import AddMiDaS
from ldm.loading import build_model
from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.ddpm import LatentUpscaleDiffusion, channels_first

SEED = 21


def images_hwc(batch: int, size: int, seed: int) -> torch.Tensor:
    """Images as data sets hold them: (b, h, w, c) in [-1, 1]."""
    return torch.rand(batch, size, size, 3, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def posterior_sample(vae, x: torch.Tensor, seed: int, scale: float) -> torch.Tensor:
    """diffusers' scaled latent of ``x``: a sample of its posterior from a generator seeded ``seed``."""
    return vae.encode(x).latent_dist.sample(torch.Generator().manual_seed(seed)) * scale


# -- LatentDiffusion ---------------------------------------------------------------------
def test_get_input_is_the_scaled_posterior_sample_and_the_prompts(tiny_eps_model):
    model = tiny_eps_model
    batch = {"jpg": images_hwc(3, 64, 0), "txt": ["a red cube", "a lighthouse", "a fox"]}
    with torch.no_grad():
        torch.manual_seed(SEED)
        z, c, x, xrec, x_again, xc = model.get_input(
            batch, "jpg", cond_key="txt", bs=2, return_first_stage_outputs=True, return_x=True, return_original_cond=True,
        )
        vae = diffusers_vae_twin(tiny_config(), model)
        expected = posterior_sample(vae, batch["jpg"][:2].permute(0, 3, 1, 2), SEED, model.scale_factor)
        context = model.get_learned_conditioning(batch["txt"])[:2]
        reconstruction = vae.decode(expected / model.scale_factor).sample
    assert z.shape == (2, 4, 8, 8) and rel_err(z, expected) <= 1e-5
    assert torch.equal(c, context)
    assert torch.equal(x, batch["jpg"][:2].permute(0, 3, 1, 2)) and x is x_again
    assert rel_err(xrec, reconstruction) <= 1e-5
    assert xc is batch["txt"]


def test_get_input_reads_the_configs_keys(tiny_eps_model):
    """SD2's configs name the images ``jpg`` and the prompts ``txt``; without them the keys are the
    original's defaults."""
    model = tiny_eps_model
    assert (model.first_stage_key, model.cond_stage_key) == ("jpg", "txt")
    batch = {"jpg": images_hwc(1, 64, 1), "txt": ["a fox"]}
    with torch.no_grad():
        torch.manual_seed(SEED)
        z, c = model.get_input(batch, model.first_stage_key)
        torch.manual_seed(SEED)
        expected = model.get_first_stage_encoding(model.encode_first_stage(channels_first(batch["jpg"])))
    assert torch.equal(z, expected) and torch.equal(c, model.get_learned_conditioning(["a fox"]))
    config = tiny_config()
    del config.model.params.first_stage_key, config.model.params.cond_stage_key
    default = build_model(config, "cpu")
    assert (default.first_stage_key, default.cond_stage_key) == ("image", "image")


def test_channels_first_takes_grey_images():
    grey = torch.rand(2, 5, 7)
    assert torch.equal(channels_first(grey), grey[:, None])
    assert channels_first(torch.rand(2, 5, 7, 3).double()).dtype == torch.float32


def test_unconditional_conditioning_is_the_empty_prompt_repeated(tiny_eps_model):
    model = tiny_eps_model
    with torch.no_grad():
        expected = model.get_learned_conditioning(3 * [""])
        demo = model.get_unconditional_conditioning(3, "")  # as every original demo calls it
        default = model.get_unconditional_conditioning(3)
        other = model.get_unconditional_conditioning(2, ["a blurry photo"])
        one = model.get_learned_conditioning("a blurry photo")  # a string is a batch of one, as open_clip's
    assert demo.shape == (3, *expected.shape[1:])
    assert torch.allclose(demo, expected, rtol=0, atol=1e-6) and torch.equal(default, demo)
    assert one.shape[0] == 1 and torch.equal(other, one.expand(2, -1, -1))


# -- inpainting ----------------------------------------------------------------------------
def test_inpaint_get_input_matches_prepare_mask_latents(tiny_inpaint_model):
    """The original's training batch: b h w c images, masks and masked images; c_concat = [mask
    resized by nearest, masked image's posterior sample], after the image's own sample."""
    from diffusers import StableDiffusionInpaintPipeline

    model = tiny_inpaint_model
    image = images_hwc(2, 64, 2)
    mask = (torch.rand(2, 64, 64, 1, generator=torch.Generator().manual_seed(3)) > 0.5).float()
    batch = {"jpg": image, "txt": ["a cat", "a dog"], "mask": mask, "masked_image": image * (1 - mask)}
    vae = diffusers_vae_twin(tiny_family_config("inpainting"), model)
    pipe = StableDiffusionInpaintPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=None, scheduler=None,
                                          safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    with torch.no_grad():
        torch.manual_seed(SEED)
        z, cond = model.get_input(batch, "jpg")
        torch.manual_seed(SEED)
        torch.randn(2, 4, 8, 8)  # the image's posterior sample comes first
        generator = torch.Generator()
        generator.set_state(torch.get_rng_state())
        ref_mask, ref_latent = pipe.prepare_mask_latents(
            channels_first(mask), channels_first(batch["masked_image"]), 2, 64, 64, torch.float32, "cpu", generator, False,
        )
    assert set(cond) == {"c_concat", "c_crossattn"} and cond["c_concat"][0].shape == (2, 5, 8, 8)
    assert torch.equal(cond["c_concat"][0][:, :1], ref_mask)
    assert rel_err(cond["c_concat"][0][:, 1:], ref_latent) <= 1e-5
    assert rel_err(z, posterior_sample(vae, channels_first(image), SEED, model.scale_factor)) <= 1e-5
    assert torch.equal(cond["c_crossattn"][0], model.get_learned_conditioning(batch["txt"]))


def test_inpaint_get_input_returns_the_first_stage_outputs(tiny_inpaint_model):
    model = tiny_inpaint_model
    mask = torch.zeros(2, 64, 64, 1)
    batch = {"jpg": images_hwc(2, 64, 4), "txt": ["a", "b"], "mask": mask, "masked_image": images_hwc(2, 64, 4)}
    with torch.no_grad():
        z, cond, x, xrec, xc = model.get_input(batch, "ignored", bs=1, return_first_stage_outputs=True)
    assert z.shape == (1, 4, 8, 8) and cond["c_concat"][0].shape == (1, 5, 8, 8) and x.shape == (1, 3, 64, 64)
    assert torch.equal(xrec, model.decode_first_stage(z)) and xc == ["a", "b"]


# -- depth ---------------------------------------------------------------------------------
def test_depth_get_input_is_the_training_normalisation_of_dpt(tiny_depth_model, transformers_dpt):
    """c_concat = DPT depth of ``midas_in``, resized bicubically to the latent, mapped to [-1, 1]
    by 2 (d - min) / (max - min + 0.001) - 1 per sample (the original's training code)."""
    model = tiny_depth_model
    net = model.depth_model.model.image_size
    adder = AddMiDaS("dpt_hybrid", net_size=net)
    samples = [adder({"jpg": img}) for img in images_hwc(2, 64, 5)]
    batch = {"jpg": torch.stack([s["jpg"] for s in samples]), "txt": ["a hall", "a tree"],
             "midas_in": torch.stack([torch.from_numpy(s["midas_in"]) for s in samples])}
    with torch.no_grad():
        _, cond = model.get_input(batch, "jpg")
        depth = transformers_dpt(pixel_values=batch["midas_in"]).predicted_depth[:, None]
    depth = F.interpolate(F.interpolate(depth, size=(net, net), mode="bicubic", align_corners=False), size=(8, 8),
                          mode="bicubic", align_corners=False)
    low, high = depth.amin(dim=(1, 2, 3), keepdim=True), depth.amax(dim=(1, 2, 3), keepdim=True)
    expected = 2 * (depth - low) / (high - low + 0.001) - 1
    assert cond["c_concat"][0].shape == (2, 1, 8, 8)
    assert torch.allclose(cond["c_concat"][0], expected, rtol=0, atol=1e-5)
    assert float(cond["c_concat"][0].amax()) < 1.0  # the epsilon, which the demos do not add


def test_add_midas_is_the_demos_midas_input(tiny_depth_model):
    """AddMiDaS on an (H, W, 3) image in [-1, 1] gives what the depth model's own ``prepare`` does
    for the (1, 3, H, W) image, as a (3, h, w) float32 array."""
    image = images_hwc(1, 40, 6)[0]
    got = AddMiDaS(net_size=64)({"jpg": image})["midas_in"]
    expected = tiny_depth_model.depth_model.prepare(image.permute(2, 0, 1)[None])[0]
    assert got.dtype == np.float32 and got.shape == (3, 64, 64)
    assert np.allclose(got, expected.numpy(), rtol=0, atol=1e-6)
    assert AddMiDaS()({"jpg": image})["midas_in"].shape == (3, 384, 384)  # SD2's MiDaS size by default


# -- x4 upscaler ---------------------------------------------------------------------------
def low_res_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="scaled_linear")


def test_low_scale_model_q_sample_matches_diffusers_add_noise(tiny_x4_model):
    x = torch.rand(3, 3, 8, 8) * 2 - 1
    noise, levels = torch.randn_like(x), torch.tensor([0, 20, 349])
    ours = tiny_x4_model.low_scale_model.q_sample(x, levels, noise)
    assert torch.allclose(ours, low_res_scheduler().add_noise(x, noise, levels), rtol=0, atol=2e-5)


def test_low_scale_model_without_a_level_draws_one_per_sample(tiny_x4_model):
    """As the original's training: levels uniform in [0, max_noise_level), then the noise."""
    low_scale = tiny_x4_model.low_scale_model
    x = torch.rand(64, 3, 4, 4) * 2 - 1
    torch.manual_seed(SEED)
    noised, levels = low_scale(x)
    torch.manual_seed(SEED)
    expected_levels = torch.randint(0, 350, (64,))
    expected = low_res_scheduler().add_noise(x, torch.randn_like(x), expected_levels)
    assert torch.equal(levels, expected_levels) and levels.dtype == torch.long and int(levels.max()) < 350
    assert torch.allclose(noised, expected, rtol=0, atol=2e-5)


def test_upscale_get_input_noises_the_low_res_images(tiny_x4_model):
    model = tiny_x4_model
    batch = {"jpg": images_hwc(2, 32, 7), "txt": ["a fox", "a wall"], "lr": images_hwc(2, 8, 8)}
    assert isinstance(model, LatentUpscaleDiffusion) and model.low_scale_key == "lr"
    with torch.no_grad():
        torch.manual_seed(SEED)
        z, cond = model.get_input(batch, "jpg")
        torch.manual_seed(SEED)
        z_ref = model.get_first_stage_encoding(model.encode_first_stage(channels_first(batch["jpg"])))
        levels = torch.randint(0, 350, (2,))
        noise = torch.randn(2, 3, 8, 8)
        logged = model.get_input(batch, "jpg", log_mode=True)
    x_low = channels_first(batch["lr"])
    assert torch.equal(z, z_ref) and torch.equal(cond["c_adm"], levels)
    assert torch.allclose(cond["c_concat"][0], low_res_scheduler().add_noise(x_low, noise, levels), rtol=0, atol=2e-5)
    assert torch.equal(cond["c_crossattn"][0], model.get_learned_conditioning(batch["txt"]))
    assert len(logged) == 8 and torch.equal(logged[5], x_low) and torch.equal(logged[7], logged[1]["c_adm"])


def tiny_upscale_finetune_model(patch: int | None, low_scale: bool):
    """A LatentUpscaleFinetuneDiffusion built from the tiny text-to-image config: the UNet reads
    the latent and the low-res image (cut into patch x patch tiles)."""
    config = tiny_config()
    params = config.model.params
    config.model.target = "ldm.models.diffusion.ddpm.LatentUpscaleFinetuneDiffusion"
    params.conditioning_key = "hybrid-adm" if low_scale else "hybrid"
    params.concat_keys = ["lr"]
    params.finetune_keys = None
    params.reshuffle_patch_size = patch
    params.unet_config.params.in_channels = 4 + 3 * (patch or 1) ** 2
    if low_scale:
        params.low_scale_config = tiny_x4_config().model.params.low_scale_config
        params.low_scale_key = "lr"
        params.unet_config.params.num_classes = 1000
    return build_model(config, "cpu").eval()


def test_upscale_finetune_reshuffles_the_low_res_image_into_tiles():
    model = tiny_upscale_finetune_model(patch=2, low_scale=False)
    image = images_hwc(2, 16, 9)
    batch = {"jpg": images_hwc(2, 8 * 8, 10), "txt": ["a", "b"], "lr": image}
    with torch.no_grad():
        z, cond = model.get_input(batch, "jpg")
    chw = channels_first(image)
    tiles = [chw[:, :, 8 * i: 8 * (i + 1), 8 * j: 8 * (j + 1)] for i in range(2) for j in range(2)]
    assert set(cond) == {"c_concat", "c_crossattn"}
    assert torch.equal(cond["c_concat"][0], torch.cat(tiles, dim=1))
    with torch.no_grad():  # the UNet takes what get_input made
        out = model.apply_model(z, torch.tensor([10, 10]), cond)
    assert out.shape == z.shape


def test_upscale_finetune_with_a_low_scale_model_conditions_on_the_levels():
    model = tiny_upscale_finetune_model(patch=None, low_scale=True)
    batch = {"jpg": images_hwc(2, 64, 11), "txt": ["a", "b"], "lr": images_hwc(2, 8, 12)}
    with torch.no_grad():
        torch.manual_seed(SEED)
        _, cond = model.get_input(batch, "jpg")
        torch.manual_seed(SEED)
        torch.randn(2, 4, 8, 8)
        levels = torch.randint(0, 350, (2,))
        noise = torch.randn(2, 3, 8, 8)
    expected = low_res_scheduler().add_noise(channels_first(batch["lr"]), noise, levels)
    assert torch.equal(cond["c_adm"], levels)
    assert torch.allclose(cond["c_concat"][0], expected, rtol=0, atol=2e-5)


@pytest.mark.parametrize("params, message", [
    ({"reshuffle_patch_size": 0}, "positive int"),
    ({"concat_keys": ["lr", "hr"]}, "one low-resolution input"),
    ({"low_scale_config": {"target": "x"}}, "needs the low_scale_key"),
])
def test_upscale_finetune_refuses_bad_options(params, message):
    config = tiny_config()
    config.model.target = "ldm.models.diffusion.ddpm.LatentUpscaleFinetuneDiffusion"
    config.model.params.finetune_keys = None
    config.model.params.update(params)
    with pytest.raises(ValueError, match=message):
        build_model(config, "cpu")


# -- unCLIP ----------------------------------------------------------------------------------
def test_unclip_get_input_embeds_and_noises_the_images(tiny_unclip_models):
    """c_adm = the augmentor's output at a random level per sample (drawn as the original, after
    the latents' sample): [un-normalised noised embedding | level embedding]; in training mode
    whole rows are zeroed with probability embedding_dropout."""
    model = tiny_unclip_models["l"]
    images = images_hwc(2, 48, 13)
    batch = {"jpg": images, "txt": ["a house", "a car"]}
    with torch.no_grad():
        torch.manual_seed(SEED)
        z, cond = model.get_input(batch, "jpg", cond_key="txt")
        torch.manual_seed(SEED)
        torch.randn(2, 4, 6, 6)
        embedding = model.embedder(channels_first(images))
        levels = torch.randint(0, model.noise_augmentor.max_noise_level, (2,))
        expected, _ = model.image_conditioning(channels_first(images), levels, cond["c_crossattn"][0])
    assert z.shape == (2, 4, 6, 6)
    assert torch.equal(cond["c_adm"], expected["c_adm"]) and cond["c_adm"].shape == (2, 2 * embedding.shape[1])
    model.train()
    try:
        model.embedding_dropout = 1.0
        with torch.no_grad():
            _, dropped = model.get_input(batch, "jpg", cond_key="txt")
    finally:
        model.eval()
        model.embedding_dropout = 0.5
    assert torch.equal(dropped["c_adm"], torch.zeros_like(cond["c_adm"]))


# -- DDIM's guidance schedule ----------------------------------------------------------------
def test_ucg_schedule_matches_a_diffusers_ddim_loop_with_per_step_guidance(tiny_eps_model, guidance_inputs):
    model, g = tiny_eps_model, guidance_inputs
    scales = [9.0, 1.0, 5.0, 1.0, 9.0]
    with torch.no_grad():
        ours, _ = DDIMSampler(model).sample(
            5, 2, (4, 8, 8), conditioning=g["c"], unconditional_conditioning=g["uc"], x_T=g["x_T"].clone(),
            unconditional_guidance_scale=3.0, ucg_schedule=scales, verbose=False,
        )
        scheduler = sd2_ddim_scheduler("eps")
        scheduler.set_timesteps(5)
        x = g["x_T"].clone()
        for t, scale in zip(scheduler.timesteps, scales):
            ts = torch.full((2,), int(t))
            eps_u, eps_c = model.apply_model(torch.cat([x, x]), torch.cat([ts, ts]), torch.cat([g["uc"], g["c"]])).chunk(2)
            x = scheduler.step(eps_u + scale * (eps_c - eps_u), t, x).prev_sample
    assert rel_err(ours, g["x_T"]) > 0.1
    assert rel_err(ours, x) <= 1e-4
    with pytest.raises(ValueError, match="4 guidance scales for 5 steps"):
        DDIMSampler(model).sample(5, 2, (4, 8, 8), conditioning=g["c"], ucg_schedule=scales[:4], verbose=False)
