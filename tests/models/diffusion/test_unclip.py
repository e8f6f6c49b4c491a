"""Stable unCLIP (ImageEmbeddingConditionedLatentDiffusion, -L and -H) against diffusers'
StableUnCLIPImg2ImgPipeline run on the same weights: its UNet and VAE converted by diffusers'
single-file converter, its image encoder a transformers CLIPVisionModelWithProjection holding
our image tower, its image normalizer holding our embedding statistics (random Karlo-style ones
for -L, none for -H), with the same text embeddings, image, noise level, starting latents and
seed, a DDIM scheduler configured as SD2's v-model, classifier-free guidance 9 for 10 steps.

The pipeline takes our preprocessed image (its own CLIPImageProcessor resizes with PIL, not as
the original; our preprocessing is checked against the original's kornia in
tests/modules/encoders/test_modules.py), embeds it, noises the embedding from its generator and
guides away from a zero embedding, as the original's demo does; our ``image_conditioning``
draws the noise with ``torch.randn_like`` after the same seed. Tolerance: relative error (L2) of
the final latents <= 5e-4; the runs differ by float32 rounding only (tower, schedules, UNet),
amplified by guidance: observed ~5e-7.
"""

from __future__ import annotations

import pytest
import torch

from conftest import (
    assert_draws_normals,
    diffusers_unet_twin,
    diffusers_vae_twin,
    guided_ddim,
    rel_err,
    tiny_unclip_config,
    transformers_vision_twin,
)
from ldm.loading import build_model
from ldm.modules.diffusionmodules.util import timestep_embedding

SCALE, STEPS, NOISE_LEVEL = 9.0, 10, 100


@pytest.fixture(scope="module", params=["l", "h"])
def kind(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def inputs(tiny_unclip_models) -> dict[str, torch.Tensor]:
    model = tiny_unclip_models["h"]  # the contexts are inputs to both kinds alike
    with torch.no_grad():
        c = model.get_learned_conditioning(["a house by a lake", "an old car"])
        uc = model.get_learned_conditioning(["", ""])
    image = torch.rand(2, 3, 48, 48, generator=torch.Generator().manual_seed(3)) * 2 - 1
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    return {"c": c, "uc": uc, "image": image, "x_T": x_T}


def unclip_pipeline(model, config):
    from diffusers import DDIMScheduler, DDPMScheduler, StableUnCLIPImg2ImgPipeline
    from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import StableUnCLIPImageNormalizer

    augmentor = model.noise_augmentor
    normalizer = StableUnCLIPImageNormalizer(embedding_dim=augmentor.data_mean.shape[1])
    normalizer.load_state_dict({"mean": augmentor.data_mean, "std": augmentor.data_std})
    scheduler = DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading", prediction_type="v_prediction",
    )
    pipe = StableUnCLIPImg2ImgPipeline(
        feature_extractor=None, image_encoder=transformers_vision_twin(model.embedder), image_normalizer=normalizer,
        image_noising_scheduler=DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2"),
        tokenizer=None, text_encoder=None, unet=diffusers_unet_twin(config, model), scheduler=scheduler,
        vae=diffusers_vae_twin(config, model, 0.18215),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_guided_ddim_matches_the_diffusers_unclip_pipeline(kind, tiny_unclip_models, tiny_clip_stats, inputs):
    model = tiny_unclip_models[kind]
    config = tiny_unclip_config(kind, tiny_clip_stats if kind == "l" else None)
    assert bool((model.noise_augmentor.data_std == 1).all()) == (kind == "h")
    with torch.no_grad():
        ref = unclip_pipeline(model, config)(
            image=model.embedder.preprocess(inputs["image"]), prompt_embeds=inputs["c"],
            negative_prompt_embeds=inputs["uc"], num_inference_steps=STEPS, guidance_scale=SCALE,
            noise_level=NOISE_LEVEL, latents=inputs["x_T"].clone(), generator=torch.Generator().manual_seed(11),
            output_type="latent", height=64, width=64,
        ).images
        torch.manual_seed(11)
        cond, uncond = model.image_conditioning(inputs["image"], NOISE_LEVEL, inputs["c"], inputs["uc"])
        ours = guided_ddim(model, cond, uncond, inputs["x_T"], STEPS, SCALE)
    assert rel_err(ours, inputs["x_T"]) > 0.1, "sampling did nothing"
    assert rel_err(ours, ref) <= 5e-4


def test_conditioning_is_the_demos(kind, tiny_unclip_models, inputs):
    """c_adm = [un-normalised (normalised embedding diffused to the level with the seed's first
    normal draw) | sinusoidal embedding of the level]; the unconditional c_adm is zeros."""
    model = tiny_unclip_models[kind]
    aug = model.noise_augmentor
    with torch.no_grad():
        embedding = model.embedder(inputs["image"])
        torch.manual_seed(0)
        cond, uncond = model.image_conditioning(inputs["image"], NOISE_LEVEL, inputs["c"], inputs["uc"])
        torch.manual_seed(0)
        from_embedding, _ = model.image_conditioning(embedding, NOISE_LEVEL, inputs["c"])
        torch.manual_seed(0)
        noise = torch.randn_like(embedding)
    scaled = (embedding - aug.data_mean) / aug.data_std
    noised = aug.sqrt_alphas_cumprod[NOISE_LEVEL] * scaled + aug.sqrt_one_minus_alphas_cumprod[NOISE_LEVEL] * noise
    expected = torch.cat([noised * aug.data_std + aug.data_mean, timestep_embedding(torch.tensor([NOISE_LEVEL] * 2), 32)], 1)
    assert torch.allclose(cond["c_adm"], expected, rtol=0, atol=1e-6)
    assert torch.equal(from_embedding["c_adm"], cond["c_adm"])
    assert cond["c_crossattn"][0] is inputs["c"] and uncond["c_crossattn"][0] is inputs["uc"]
    assert torch.equal(uncond["c_adm"], torch.zeros(2, 64))


def test_one_image_is_repeated_before_embedding_and_draws_once(tiny_unclip_models, inputs):
    model = tiny_unclip_models["l"]
    one = inputs["image"][:1]
    with torch.no_grad():
        torch.manual_seed(2)
        single, _ = model.image_conditioning(one, 0, inputs["c"])
        torch.manual_seed(2)
        repeated, _ = model.image_conditioning(one.repeat(2, 1, 1, 1), 0, inputs["c"])
    assert torch.equal(single["c_adm"], repeated["c_adm"])
    assert_draws_normals(lambda: model.image_conditioning(one, 0, inputs["c"]), 1, shape=(2, 32))


def test_missing_statistics_fail_at_image_conditioning_only(tmp_path, inputs):
    """unCLIP-L's checkpoint lacks Karlo's statistics: without the file the model still builds,
    loads and encodes text; asking for image conditioning says what the file is."""
    model = build_model(tiny_unclip_config("l", tmp_path / "ViT-L-14_stats.th"), "cpu").eval()
    with torch.no_grad():
        model.get_learned_conditioning(["a cat"])
        with pytest.raises(FileNotFoundError, match="ViT-L-14_stats.th.*Karlo"):
            model.image_conditioning(inputs["image"], 0, inputs["c"])
