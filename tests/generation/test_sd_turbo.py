"""SD-Turbo's sampling against diffusers' StableDiffusionPipeline and StableDiffusionImg2ImgPipeline,
as its model card runs them (``guidance_scale=0.0``, trailing timesteps), on identical random weights:
our txt2img and img2img pipelines with Euler ancestral and Euler at 1 and 4 steps (and img2img at
2 steps, strength 0.5), through the same code the scripts use, on a tiny model in SD-Turbo's
generative-models layout whose config carries sd-turbo.yaml's ``sampling:`` defaults.

The same random numbers on both sides: ours come from the global generator seeded as a run seeds it
(the starting noise first, as the original draws it, then each ancestral step's); diffusers' from a
generator with that seed, advanced past the starting noise, which is passed as ``latents``. Starting
latents differ by convention: ours ``noise * sqrt(1 + sigma_max^2)`` (generative-models', ComfyUI's and
the original DDIM's), diffusers' trailing spacing ``noise * sigma_max``; diffusers is given
``noise * sqrt(1 + sigma_max^2) / sigma_max``, which its pipeline multiplies by ``sigma_max``.

Tolerance: relative error (L2) of the decoded images <= 1e-4: float32 schedules computed apart
(diffusers' cumulative product in float32, ours in float64), two UNet and VAE implementations.
"""

from __future__ import annotations

import math

import pytest
import torch

from omegaconf import OmegaConf

from conftest import CONFIGS, diffusers_unet_twin, diffusers_vae_twin, randomize_, rel_err, tiny_config, tiny_sgm_config
from ldm.checkpoint import save_state_dict
from ldm.generation import options
from ldm.generation.model import Model
from ldm.generation.run import render
from ldm.generation.settings import ModelSettings, SamplingSettings
from ldm.generation.tasks import Img2ImgPipeline, Txt2ImgPipeline
from ldm.models.diffusion.schedules import ModelSigmas

SEED, PROMPT = 7, "a photograph of a red fox"


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Model:
    """A tiny SD-Turbo: the tiny SD2 structure in sd-turbo.yaml's class and layout, with its sampling defaults."""
    from ldm.loading import build_model

    folder = tmp_path_factory.mktemp("sd-turbo")
    config = tiny_sgm_config()
    config.sampling = OmegaConf.load(CONFIGS / "sd-turbo.yaml").sampling
    OmegaConf.save(config, folder / "tiny-sd-turbo.yaml")
    save_state_dict(randomize_(build_model(config, "cpu"), seed=3).state_dict(), folder / "tiny-sd-turbo.safetensors")
    model = Model(ModelSettings(config=folder / "tiny-sd-turbo.yaml", ckpt=folder / "tiny-sd-turbo.safetensors",
                                device="cpu", precision="full"))
    model.load()
    return model


def test_the_scripts_default_to_sd_turbos_sampling(model):
    """No flags: 1 step of Euler ancestral on the trailing schedule without guidance; img2img 2 steps at 0.5."""
    args = options.build_parser("txt2img").parse_args([])
    assert options.sampling_from_args(args, "txt2img", model) == SamplingSettings("euler_ancestral", 1, None, 1.0, schedule="trailing")
    args = options.build_parser("img2img").parse_args(["--init-img", "x.png"])
    sampling = options.sampling_from_args(args, "img2img", model)
    assert (sampling.sampler, sampling.steps, sampling.scale, args.strength) == ("euler_ancestral", 2, 1.0, 0.5)
    pipeline = Txt2ImgPipeline(model, SamplingSettings("euler_ancestral", 1, scale=1.0, schedule="trailing"))
    assert (pipeline.eta, pipeline.guided, pipeline.steps_per_batch, pipeline.unet_calls_per_batch) == (1.0, False, 1, 1)


def diffusers_scheduler(sampler: str, timesteps: list[int] | None = None):
    from diffusers import EulerAncestralDiscreteScheduler, EulerDiscreteScheduler

    kind = EulerAncestralDiscreteScheduler if sampler == "euler_ancestral" else EulerDiscreteScheduler
    return kind(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                timestep_spacing="trailing", prediction_type="epsilon")


@pytest.fixture(scope="module")
def components(model):
    net = model.net
    return {"unet": diffusers_unet_twin(tiny_config(), net), "vae": diffusers_vae_twin(tiny_config(), net, net.scale_factor)}


def diffusers_pipeline(kind: str, components, scheduler):
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

    cls = StableDiffusionPipeline if kind == "txt2img" else StableDiffusionImg2ImgPipeline
    pipe = cls(vae=components["vae"], text_encoder=None, tokenizer=None, unet=components["unet"], scheduler=scheduler,
               safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def start_scale(model: Model) -> float:
    """sqrt(1 + sigma_max^2) / sigma_max: our start in diffusers' units (see the module docstring)."""
    sigma = ModelSigmas(model.net.alphas_cumprod).sigma_max
    return math.sqrt(1 + sigma**2) / sigma


@pytest.mark.parametrize("sampler", ["euler_ancestral", "euler"])
@pytest.mark.parametrize("steps", [1, 4])
def test_txt2img_equals_diffusers(model, components, sampler, steps):
    pipeline = Txt2ImgPipeline(model, SamplingSettings(sampler, steps, scale=1.0, seed=SEED, schedule="trailing"),
                               height=64, width=64)
    ours = render(pipeline, [PROMPT])
    with torch.no_grad():
        c = model.net.get_learned_conditioning([PROMPT])
        gen = torch.Generator().manual_seed(SEED)
        noise = torch.randn((1, *pipeline.latent_shape), generator=gen)
        ref = diffusers_pipeline("txt2img", components, diffusers_scheduler(sampler))(
            prompt_embeds=c, num_inference_steps=steps, guidance_scale=0.0, height=64, width=64,
            latents=noise * start_scale(model), generator=gen, output_type="pt",
        ).images
    assert pipeline.steps_per_batch == pipeline.unet_calls_per_batch == steps
    assert rel_err(ours, ref) <= 1e-4


@pytest.mark.parametrize("sampler, steps, strength", [("euler_ancestral", 2, 0.5), ("euler_ancestral", 4, 0.5), ("euler", 4, 0.75)])
def test_img2img_equals_diffusers(model, components, sampler, steps, strength):
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    pipeline = Img2ImgPipeline(model, SamplingSettings(sampler, steps, scale=1.0, seed=SEED, schedule="trailing"),
                               image * 2 - 1, strength)
    ours = render(pipeline, [PROMPT])
    with torch.no_grad():
        c = model.net.get_learned_conditioning([PROMPT])
        ref = diffusers_pipeline("img2img", components, diffusers_scheduler(sampler))(
            prompt_embeds=c, image=image, strength=strength, num_inference_steps=steps, guidance_scale=0.0,
            generator=torch.Generator().manual_seed(SEED), output_type="pt",
        ).images
    assert pipeline.steps_per_batch == int(steps * strength)
    assert rel_err(ours, ref) <= 1e-4


def test_generative_models_subset_equals_diffusers_at_those_timesteps(model, components):
    """The turbo schedule: generative-models' own SD-Turbo timesteps (999, 899, 799, 699)."""
    pipeline = Txt2ImgPipeline(model, SamplingSettings("euler", 4, scale=1.0, seed=SEED, schedule="turbo"), height=64, width=64)
    ours = render(pipeline, [PROMPT])
    with torch.no_grad():
        c = model.net.get_learned_conditioning([PROMPT])
        gen = torch.Generator().manual_seed(SEED)
        noise = torch.randn((1, *pipeline.latent_shape), generator=gen)
        ref = diffusers_pipeline("txt2img", components, diffusers_scheduler("euler"))(
            prompt_embeds=c, timesteps=[999, 899, 799, 699], guidance_scale=0.0, height=64, width=64,
            latents=noise * start_scale(model), generator=gen, output_type="pt",
        ).images
    assert rel_err(ours, ref) <= 1e-4
