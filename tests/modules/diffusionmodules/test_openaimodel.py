"""The SD2 UNet against diffusers' UNet2DConditionModel holding the same (random) weights.

diffusers is an independent implementation; its single-file converter maps the original
checkpoint layout onto it. Both compute in float32 with different operation orders
(attention kernels, fused vs separate projections), so outputs agree to float32 rounding
amplified through ~20 layers: we require a relative error (L2 norm of the difference over
the L2 norm of the reference) of at most 1e-4; observed values are around 1e-6.
"""

from __future__ import annotations

import pytest
import torch

from conftest import diffusers_unet_like, randomize_, rel_err, tiny_config, tiny_family_config
from ldm.loading import build_model

RTOL = 1e-4


def inputs(batch: int = 2, size: int = 8, context_dim: int = 48, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, size, size, generator=gen)
    # Integer timesteps (DDIM, PLMS) and the fractional ones DPM-Solver feeds the network.
    t = torch.tensor([1.0, 999.0, 457.5, 0.25][:batch])
    context = torch.randn(batch, 77, context_dim, generator=gen)
    return x, t, context


@pytest.mark.parametrize("parameterization", ["eps", "v"])
def test_unet_matches_diffusers(parameterization, tiny_eps_model, tiny_v_model, diffusers_unet):
    model = tiny_eps_model if parameterization == "eps" else tiny_v_model
    x, t, context = inputs(batch=4)
    with torch.no_grad():
        ours = model.apply_model(x, t, context)
        ref = diffusers_unet(x, t, encoder_hidden_states=context).sample
    assert ours.shape == ref.shape == x.shape
    assert ref.abs().mean() > 0.1, "the reference output is degenerate: the comparison would prove nothing"
    assert rel_err(ours, ref) <= RTOL


VARIANTS = {
    # SD2's pattern at small scale: two res blocks per level and a deepest level without attention.
    "sd2-levels": {"channel_mult": [1, 2, 2], "num_res_blocks": 2, "attention_resolutions": [2, 1]},
    # SD 1.x style: a fixed head count instead of a fixed head width, and convolutional
    # projections in and out of the transformers.
    "num-heads-conv-proj": {"num_heads": 2, "num_head_channels": -1, "use_linear_in_transformer": False},
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_unet_variants_match_diffusers(variant):
    config = tiny_config()
    for key, value in VARIANTS[variant].items():
        config.model.params.unet_config.params[key] = value
    model = randomize_(build_model(config, "cpu"), seed=3).eval()
    unet = diffusers_unet_like(config, model)
    x, t, context = inputs()
    with torch.no_grad():
        ours = model.apply_model(x, t, context)
        ref = unet(x, t, encoder_hidden_states=context).sample
    assert ref.abs().mean() > 0.1
    assert rel_err(ours, ref) <= RTOL


@pytest.mark.parametrize("family, extra", [("inpainting", 5), ("depth", 1)])
def test_unet_with_concatenated_inputs_matches_diffusers(request, family, extra):
    """The inpainting (9 input channels) and depth (5) UNets, the extra maps given as c_concat."""
    model = request.getfixturevalue("tiny_inpaint_model" if family == "inpainting" else "tiny_depth_model")
    unet = diffusers_unet_like(tiny_family_config(family), model)
    x, t, context = inputs(batch=4)
    maps = torch.randn(4, extra, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = model.apply_model(x, t, {"c_concat": [maps], "c_crossattn": [context]})
        ref = unet(torch.cat([x, maps], dim=1), t, encoder_hidden_states=context).sample
    assert ref.shape == x.shape and ref.abs().mean() > 0.1
    assert rel_err(ours, ref) <= RTOL


def test_gradient_checkpointing_changes_nothing_but_memory(tiny_eps_model):
    unet = tiny_eps_model.model.diffusion_model
    assert all(getattr(m, "use_checkpoint", True) for m in unet.input_blocks[1])
    x, t, context = inputs()
    with torch.no_grad():
        ref = unet(x, t, context)
    x.requires_grad_(True)
    out = unet(x, t, context)
    out.square().mean().backward()
    assert torch.allclose(out.detach(), ref, rtol=1e-6, atol=1e-6)
    assert x.grad is not None and x.grad.abs().sum() > 0
    unet.zero_grad(set_to_none=True)


def test_unet_rejects_options_sd2_does_not_use():
    config = tiny_config()
    config.model.params.unet_config.params.num_classes = 10
    with pytest.raises(ValueError, match="num_classes"):
        build_model(config, "meta")


def test_feature_maps_stay_contiguous_nchw(tiny_eps_model):
    """A channels-last view leaking out of a spatial transformer would make every later
    convolution re-layout its weights (1.8x slower on the full UNet): every conv sees NCHW."""
    unet = tiny_eps_model.model.diffusion_model
    seen = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].is_contiguous()))
             for m in unet.modules() if isinstance(m, torch.nn.Conv2d)]
    try:
        with torch.no_grad():
            unet(torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 77, 48))
    finally:
        for h in hooks:
            h.remove()
    assert seen and all(seen)
