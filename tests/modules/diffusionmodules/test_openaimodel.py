"""The SD2 UNet against diffusers' UNet2DConditionModel holding the same (random) weights,
the class-conditional UNets of the x4 upscaler and unCLIP included.

diffusers is an independent implementation; its single-file converter maps the original
checkpoint layout onto it. Both compute in float32 with different operation orders
(attention kernels, fused vs separate projections), so outputs agree to float32 rounding
amplified through ~20 layers: we require a relative error (L2 norm of the difference over
the L2 norm of the reference) of at most 1e-4; observed values are around 1e-6.
"""

from __future__ import annotations

import pytest
import torch

from conftest import diffusers_unet_twin, randomize_, rel_err, tiny_config, tiny_unclip_config, tiny_x4_config, unet_inputs
from ldm.loading import build_model

RTOL = 1e-4


def inputs(batch: int = 2):
    """Integer timesteps (DDIM, PLMS) and the fractional ones DPM-Solver feeds the network; 77 tokens."""
    return unet_inputs(batch, tokens=77, seed=1, timesteps=(1.0, 999.0, 457.5, 0.25))


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
    unet = diffusers_unet_twin(config, model)
    x, t, context = inputs()
    with torch.no_grad():
        ours = model.apply_model(x, t, context)
        ref = unet(x, t, encoder_hidden_states=context).sample
    assert ref.abs().mean() > 0.1
    assert rel_err(ours, ref) <= RTOL


# -- class-conditional UNets: the x4 upscaler's (noise level as an nn.Embedding label) and
# unCLIP's ("sequential": a projected embedding vector), against diffusers' class_embedding
# (num_class_embeds, and class_embed_type "projection") holding the same weights.
def class_labels(family: str, batch: int, seed: int = 2) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if family == "x4":
        return torch.randint(0, 351, (batch,), generator=gen)
    return torch.randn(batch, 64, generator=gen)


@pytest.fixture(scope="module", params=["x4", "unclip"])
def class_conditional(request, tiny_x4_model, tiny_unclip_models):
    """(family, tiny model, diffusers twin of its UNet)."""
    if request.param == "x4":
        model, config = tiny_x4_model, tiny_x4_config()
    else:
        model, config = tiny_unclip_models["h"], tiny_unclip_config("h")
    return request.param, model, diffusers_unet_twin(config, model)


def test_class_conditional_unet_matches_diffusers(class_conditional):
    family, model, unet = class_conditional
    expected = (1000, None) if family == "x4" else (None, "projection")
    assert (unet.config.num_class_embeds, unet.config.class_embed_type) == expected
    x, t, context = inputs(batch=4)
    if family == "x4":  # the 4 latent channels and the noised low-resolution RGB image
        x = torch.cat([x, torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(3))], 1)
    y = class_labels(family, 4)
    with torch.no_grad():
        ours = model.model.diffusion_model(x, t, context, y=y)
        ref = unet(x, t, encoder_hidden_states=context, class_labels=y).sample
        other_labels = model.model.diffusion_model(x, t, context, y=class_labels(family, 4, seed=9))
    assert ref.abs().mean() > 0.1
    assert rel_err(ours, ref) <= RTOL
    # Other labels move the output by ~1%, orders of magnitude above the tolerance: the label path is compared.
    assert rel_err(other_labels, ours) > 1e-3


def test_labels_are_required_exactly_by_class_conditional_unets(tiny_x4_model, tiny_eps_model):
    x, t, context = inputs()
    with pytest.raises(ValueError, match="class-conditional"):
        tiny_x4_model.model.diffusion_model(torch.cat([x, x[:, :3]], 1), t, context)
    with pytest.raises(ValueError, match="class-conditional"):
        tiny_eps_model.model.diffusion_model(x, t, context, y=torch.tensor([1, 2]))


def test_label_layouts_are_the_originals(tiny_x4_model, tiny_unclip_models):
    def labels(model) -> dict:
        state = model.model.diffusion_model.state_dict()
        return {k: tuple(v.shape) for k, v in state.items() if k.startswith("label_emb")}

    x4, unclip = labels(tiny_x4_model), labels(tiny_unclip_models["l"])
    assert x4 == {"label_emb.weight": (1000, 128)}
    assert unclip == {"label_emb.0.0.weight": (128, 64), "label_emb.0.0.bias": (128,),
                      "label_emb.0.2.weight": (128, 128), "label_emb.0.2.bias": (128,)}


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


@pytest.mark.parametrize("option, value, message", [
    ("num_classes", "continuous", "num_classes='continuous'"),
    ("adm_in_channels", 64, "adm_in_channels without num_classes='sequential'"),
    ("use_scale_shift_norm", True, "use_scale_shift_norm"),
])
def test_unet_rejects_options_sd2_does_not_use(option, value, message):
    config = tiny_config()
    config.model.params.unet_config.params[option] = value
    with pytest.raises(ValueError, match=message):
        build_model(config, "meta")


def test_sequential_labels_need_adm_in_channels():
    config = tiny_config()
    config.model.params.unet_config.params.num_classes = "sequential"
    with pytest.raises(ValueError, match="adm_in_channels"):
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
