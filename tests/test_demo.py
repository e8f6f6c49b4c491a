"""The shipped demo model draws what it is asked: the named colour dominates the shape's
pixels, and the shape's fill ratio of its bounding box (circle pi/4, square 1, triangle 1/2)
tells circles, squares and triangles apart. Also: the file loads strictly, offline, and
stays within its size budget."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from safetensors import safe_open

from conftest import ROOT, fill_ratio, shape_mask
from ldm.loading import load_model_from_config
from ldm.models.diffusion.ddim import DDIMSampler

CONFIG = ROOT / "configs" / "demo" / "shapes-demo.yaml"
WEIGHTS = ROOT / "ldm" / "demo" / "shapes-demo.safetensors"
PROMPTS = {"a red circle": ("red", "circle"), "a green square": ("green", "square"), "a blue triangle": ("blue", "triangle")}
SEEDS = (0, 1, 2)
STEPS, SCALE = 20, 4.0


@pytest.fixture(scope="module")
def model():
    return load_model_from_config(CONFIG, WEIGHTS)


@pytest.fixture(scope="module")
def images(model) -> dict[str, np.ndarray]:
    """Each prompt drawn from the same seeded starting latents, as uint8 (N, H, W, 3)."""
    prompts = [p for p in PROMPTS for _ in SEEDS]
    shape = (model.channels, model.image_size, model.image_size)
    x_T = torch.cat([torch.randn((1, *shape), generator=torch.Generator().manual_seed(s)) for s in SEEDS] * len(PROMPTS))
    with torch.no_grad():
        c = model.get_learned_conditioning(prompts)
        uc = model.get_learned_conditioning([""] * len(prompts))
        z, _ = DDIMSampler(model).sample(S=STEPS, batch_size=len(prompts), shape=shape, conditioning=c, x_T=x_T,
                                         unconditional_guidance_scale=SCALE, unconditional_conditioning=uc,
                                         eta=0.0, verbose=False)
        x = model.decode_first_stage(z)
    x = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return {p: x[i * len(SEEDS):(i + 1) * len(SEEDS)] for i, p in enumerate(PROMPTS)}


def test_weights_fit_the_budget_and_load_strictly(model):
    assert WEIGHTS.stat().st_size <= 25 * 1024 * 1024
    assert not model.use_ema
    assert model.image_size * model.first_stage_model.downsampling_factor == 32


def test_weights_were_trained_with_the_inference_configs_scale_factor():
    with safe_open(WEIGHTS, "pt") as f:
        trained = OmegaConf.create(f.metadata()["config"])
    assert trained.params.ldm_config.params.scale_factor == OmegaConf.load(CONFIG).model.params.scale_factor


def test_prompts_give_different_images(images):
    a, b = images["a red circle"].astype(int), images["a blue triangle"].astype(int)
    assert np.abs(a - b).mean() > 20


@pytest.mark.parametrize("prompt", list(PROMPTS))
def test_the_named_colour_dominates_the_shape(images, prompt):
    colour = PROMPTS[prompt][0]
    channel = ["red", "green", "blue"].index(colour)
    for image in images[prompt]:
        mask = shape_mask(image.astype(int))
        assert mask.sum() > 20, f"{prompt}: no shape drawn"
        rgb = image[mask].astype(float).mean(0)
        others = np.delete(rgb, channel)
        assert rgb[channel] > others.max() + 30, f"{prompt}: mean shape colour {rgb.round()}"


def test_the_fill_ratio_tells_the_shapes_apart(images):
    fill = {PROMPTS[p][1]: [fill_ratio(shape_mask(im.astype(int))) for im in images[p]] for p in PROMPTS}
    report = json.dumps({k: [round(v, 2) for v in vs] for k, vs in fill.items()})
    assert min(fill["square"]) > max(fill["circle"]) > 0 and min(fill["circle"]) > max(fill["triangle"]), report
    assert np.median(fill["square"]) > 0.85 and np.median(fill["triangle"]) < 0.65, report
    assert 0.65 < np.median(fill["circle"]) < 0.9, report


def test_deterministic_samplers_converge_to_the_same_image(model):
    """As in AUTOMATIC1111, switching deterministic samplers at high step counts keeps the image: every
    sampler starts from the original's noise and solves the same ODE. On the trained model, DDIM at
    100 steps and DPM++ 2M Karras at 50 agree within 2 of 255 (tools/sampler_convergence.py,
    2026-12-03: DDIM-50 and DPM++ 2M Karras-50 are 0.73 and 0.13 from the converged images, which are
    0.40 apart), and 5 steps are far from both."""
    from ldm.models.diffusion.samplers import SAMPLERS
    from ldm.models.diffusion.sampling import SampleRequest

    prompts = list(PROMPTS)
    shape = (len(prompts), model.channels, model.image_size, model.image_size)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        c = model.get_learned_conditioning(prompts)
        uc = model.get_learned_conditioning([""] * len(prompts))

        def image(name: str, steps: int, schedule: str) -> torch.Tensor:
            z = SAMPLERS[name].sample(model, SampleRequest(c, uc, 9.0, steps, shape, schedule=schedule, noise=noise, eta=0.0 if name == "ddim" else None))
            return ((model.decode_first_stage(z).clamp(-1, 1) + 1) * 127.5).round()

        ddim, dpmpp = image("ddim", 100, "uniform"), image("dpmpp_2m", 50, "karras")
        few = image("dpmpp_2m", 5, "karras")
    assert (ddim - dpmpp).abs().mean() < 2.0
    assert (ddim - few).abs().mean() > 5 * (ddim - dpmpp).abs().mean()  # and 5 steps are not there yet
