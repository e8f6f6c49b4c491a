"""ControlNet (ldm.modules.diffusionmodules.controlnet) against diffusers on identical random weights:
ControlNetModel converted from our state dict by diffusers' own single-file converter, the UNet's
residual inputs, and StableDiffusionControlNetPipeline (one and two ControlNets, DDIM and Euler);
plus the real SD2.1 ControlNet layout, built from the original's structure and the real SD2 UNet's
key list, against the config's meta model.

Tolerances (relative error, L2): residuals and UNet outputs 1e-5 (float32 rounding of two
implementations of the same convolutions and attention; observed ~1e-7); 10-step samples 1e-4, as
tests/models/diffusion/test_ddim.py (schedules in float32 vs float64, guidance amplifying rounding).
"""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf

from conftest import ROOT, diffusers_unet_twin, diffusers_vae_twin, randomize_, rel_err, sd2_ddim_scheduler, tiny_config
from ldm.checkpoint import CheckpointError, save_state_dict
from ldm.models.diffusion.samplers import SAMPLERS
from ldm.models.diffusion.sampling import SampleRequest
from ldm.modules.diffusionmodules.controlnet import Control, ControlNet, controlnet_params, load_controlnet

SCALE, STEPS = 9.0, 10


def tiny_unet_params() -> dict:
    return OmegaConf.to_container(tiny_config().model.params.unet_config.params)


def tiny_controlnet(seed: int) -> ControlNet:
    return randomize_(ControlNet(**controlnet_params(tiny_unet_params())), seed).eval()


def diffusers_controlnet_twin(net: ControlNet):
    """diffusers' ControlNetModel holding ``net``, by diffusers' single-file converter."""
    from diffusers import ControlNetModel
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint, create_unet_diffusers_config_from_ldm

    state = net.state_dict()
    # diffusers' create_controlnet_diffusers_config_from_ldm (0.42) calls the UNet's without the
    # checkpoint; this is what it computes: the UNet's block structure, the hint's channels.
    unet = create_unet_diffusers_config_from_ldm(OmegaConf.to_container(tiny_config(), resolve=True),
                                                 {f"model.diffusion_model.{k}": v for k, v in state.items()})
    fields = ("in_channels", "down_block_types", "block_out_channels", "layers_per_block", "cross_attention_dim",
              "attention_head_dim", "use_linear_projection", "class_embed_type", "addition_embed_type",
              "addition_time_embed_dim", "projection_class_embeddings_input_dim", "transformer_layers_per_block")
    config = {"conditioning_channels": 3, **{k: unet[k] for k in fields}}
    twin = ControlNetModel(**config)
    twin.load_state_dict(convert_controlnet_checkpoint(state, config), strict=True)
    return twin.eval()


@pytest.fixture(scope="module")
def nets() -> list[ControlNet]:
    return [tiny_controlnet(1), tiny_controlnet(2)]


@pytest.fixture(scope="module")
def inputs(guidance_inputs) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    return {**guidance_inputs, "hints": [torch.rand(2, 3, 64, 64, generator=gen) for _ in range(2)],
            "t": torch.tensor([999, 421])}


def test_residuals_match_diffusers_controlnet(nets, inputs):
    x, t, c = inputs["x_T"], inputs["t"], inputs["c"]
    with torch.no_grad():
        ours = nets[0](x, inputs["hints"][0], t, c)
        down, mid = diffusers_controlnet_twin(nets[0])(x, t, c, controlnet_cond=inputs["hints"][0], return_dict=False)
    assert len(ours) == len(down) + 1
    for a, b in zip(ours, [*down, mid]):
        assert a.shape == b.shape and rel_err(a, b) <= 1e-5
    assert min(r.norm().item() for r in ours) > 0  # the zero convolutions were given random weights


def test_controlled_unet_matches_diffusers_with_additional_residuals(tiny_eps_model, diffusers_unet, nets, inputs):
    x, t, c = inputs["x_T"], inputs["t"], inputs["c"]
    with torch.no_grad():
        residuals = nets[0](x, inputs["hints"][0], t, c)
        ours = tiny_eps_model.model.diffusion_model(x, t, context=c, control=residuals)
        ref = diffusers_unet(x, t, c, down_block_additional_residuals=residuals[:-1],
                             mid_block_additional_residual=residuals[-1]).sample
        plain = tiny_eps_model.model.diffusion_model(x, t, context=c)
    assert rel_err(ours, ref) <= 1e-5 and rel_err(ours, plain) > 1e-3


def controlnet_pipeline(model, controlnet, scheduler=None):
    from diffusers import StableDiffusionControlNetPipeline

    config = tiny_config()
    pipe = StableDiffusionControlNetPipeline(
        vae=diffusers_vae_twin(config, model), text_encoder=None, tokenizer=None, unet=diffusers_unet_twin(config, model),
        controlnet=controlnet, scheduler=scheduler or sd2_ddim_scheduler("eps"), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def controls(nets, hints, weights, start=0.0, end=1.0, guess_mode=False) -> tuple[list[Control], list[Control]]:
    """The cond and uncond ``c_control`` lists (the window as fractions of the timestep range)."""
    cond = [Control(net, hint, torch.full((2,), w), (1 - end) * 999, (1 - start) * 999, guess_mode)
            for net, hint, w in zip(nets, hints, weights)]
    return cond, [c.without_guidance() if guess_mode else c for c in cond]


@pytest.mark.parametrize("count", [1, 2])
def test_guided_ddim_matches_the_diffusers_controlnet_pipeline(tiny_eps_model, nets, inputs, count):
    """One ControlNet (weight 0.8), or two (0.8 and 0.5, as MultiControlNetModel), from step 2 to
    step 8 of 10: diffusers counts steps, ours the timestep range; for DDIM's uniform grid
    (901, 801, ..., 1) the two select the same steps."""
    from diffusers import MultiControlNetModel

    weights = [0.8, 0.5][:count]
    twins = [diffusers_controlnet_twin(net) for net in nets[:count]]
    pipe = controlnet_pipeline(tiny_eps_model, twins[0] if count == 1 else MultiControlNetModel(twins))
    hints = inputs["hints"][:count]
    with torch.no_grad():
        ref = pipe(prompt_embeds=inputs["c"], negative_prompt_embeds=inputs["uc"], image=hints[0] if count == 1 else hints,
                   num_inference_steps=STEPS, guidance_scale=SCALE, latents=inputs["x_T"].clone(), output_type="latent",
                   controlnet_conditioning_scale=weights[0] if count == 1 else weights,
                   control_guidance_start=0.2, control_guidance_end=0.8, height=64, width=64).images
        cond, uncond = controls(nets, hints, weights, start=0.2, end=0.8)
        ours = SAMPLERS["ddim"].sample(tiny_eps_model, SampleRequest(
            {"c_crossattn": [inputs["c"]], "c_control": cond}, {"c_crossattn": [inputs["uc"]], "c_control": uncond},
            SCALE, STEPS, (2, 4, 8, 8), eta=0.0, noise=inputs["x_T"]))
    assert rel_err(ours, inputs["x_T"]) > 0.1, "sampling did nothing"
    assert rel_err(ours, ref) <= 1e-4


def test_euler_matches_the_diffusers_controlnet_pipeline_with_its_scheduler(tiny_eps_model, nets, inputs):
    """Euler on the Karras schedule; diffusers starts from latents * sigma_max, ours from
    x_T * sqrt(1 + sigma_max^2), so it is given x_T * sqrt(1 + sigma_max^2) / sigma_max."""
    from diffusers import EulerDiscreteScheduler

    scheduler = EulerDiscreteScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                       beta_schedule="scaled_linear", use_karras_sigmas=True)
    sigma_max = scheduler.sigmas.max().item()
    pipe = controlnet_pipeline(tiny_eps_model, diffusers_controlnet_twin(nets[0]), scheduler)
    with torch.no_grad():
        ref = pipe(prompt_embeds=inputs["c"], negative_prompt_embeds=inputs["uc"], image=inputs["hints"][0],
                   num_inference_steps=STEPS, guidance_scale=SCALE, height=64, width=64, output_type="latent",
                   latents=inputs["x_T"] * (math.sqrt(1 + sigma_max**2) / sigma_max)).images
        cond, uncond = controls(nets[:1], inputs["hints"][:1], [1.0])
        ours = SAMPLERS["euler"].sample(tiny_eps_model, SampleRequest(
            {"c_crossattn": [inputs["c"]], "c_control": cond}, {"c_crossattn": [inputs["uc"]], "c_control": uncond},
            SCALE, STEPS, (2, 4, 8, 8), schedule="karras", noise=inputs["x_T"]))
    assert rel_err(ours, ref) <= 1e-4


def test_guess_mode_is_the_originals(tiny_eps_model, diffusers_unet, nets, inputs):
    """The original's guess mode: residual i of n weighted 0.825 ** (n - 1 - i) (diffusers uses
    10 ** (-1 + i / (n - 1)), 0.5% apart), the unconditional rows without control."""
    x, t, c = inputs["x_T"], inputs["t"], inputs["c"]
    cond, uncond = controls(nets[:1], inputs["hints"][:1], [0.7], guess_mode=True)
    with torch.no_grad():
        ours = tiny_eps_model.apply_model(x, t, {"c_crossattn": [c], "c_control": cond})
        ours_uncond = tiny_eps_model.apply_model(x, t, {"c_crossattn": [c], "c_control": uncond})
        down, mid = diffusers_controlnet_twin(nets[0])(x, t, c, controlnet_cond=inputs["hints"][0], return_dict=False)
        n = len(down) + 1
        scaled = [r * 0.7 * 0.825 ** (n - 1 - i) for i, r in enumerate([*down, mid])]
        ref = diffusers_unet(x, t, c, down_block_additional_residuals=scaled[:-1], mid_block_additional_residual=scaled[-1]).sample
        plain = diffusers_unet(x, t, c).sample
    assert rel_err(ours, ref) <= 1e-5
    assert rel_err(ours_uncond, plain) <= 1e-5


def test_the_window_gates_per_row_on_the_device(nets, inputs):
    """Outside [t_low, t_high] a row's residuals are zero; no host sync decides it."""
    control = Control(nets[0], inputs["hints"][0], torch.ones(2), t_low=200.0, t_high=800.0)
    with torch.no_grad():
        inside_outside = control.residuals(inputs["x_T"], torch.tensor([500, 900]), inputs["c"])
        both_inside = control.residuals(inputs["x_T"], torch.tensor([500, 500]), inputs["c"])
    for r, full in zip(inside_outside, both_inside):
        assert torch.equal(r[0], full[0]) and not r[1].any()


def test_load_strips_the_control_model_prefix_and_converts_to_native_mha(tmp_path, nets, inputs):
    net = nets[0]
    save_state_dict({f"control_model.{k}": v for k, v in net.state_dict().items()}, tmp_path / "cldm.safetensors")
    save_state_dict(net.state_dict(), tmp_path / "bare.safetensors")
    params = tiny_unet_params()
    native = load_controlnet(tmp_path / "cldm.safetensors", {**params, "use_native_mha": True})
    bare = load_controlnet(tmp_path / "bare.safetensors", params)
    x, t, c, hint = inputs["x_T"], inputs["t"], inputs["c"], inputs["hints"][0]
    with torch.no_grad():
        expected = net(x, hint, t, c)
        for got in (bare(x, hint, t, c), native(x, hint, t, c)):
            assert all(rel_err(a, b) <= 1e-5 for a, b in zip(got, expected))
    assert any("in_proj_weight" in k for k in native.state_dict())


def test_bad_controlnet_files_are_explained(tmp_path, nets):
    params = tiny_unet_params()
    state = nets[0].state_dict()
    sd1 = dict(state)
    key = "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    sd1[key] = torch.zeros(state[key].shape[0], 768)
    save_state_dict(sd1, tmp_path / "sd15.safetensors")
    with pytest.raises(CheckpointError, match="for SD 1.x"):
        load_controlnet(tmp_path / "sd15.safetensors", params)
    save_state_dict({k: v for k, v in state.items() if not k.startswith("zero_convs.1.")}, tmp_path / "partial.safetensors")
    with pytest.raises(CheckpointError, match="zero_convs.1.0.weight"):
        load_controlnet(tmp_path / "partial.safetensors", params)
    save_state_dict({"weight": torch.zeros(3)}, tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match="not a ControlNet"):
        load_controlnet(tmp_path / "other.safetensors", params)


def real_controlnet_keys(sd2_keys: dict[str, list[int]]) -> dict[str, list[int]]:
    """The SD2.1 ControlNet layout (thibaud/controlnet-sd21), from the facts of the original's
    cldm.py: the SD2 UNet's own time_embed, input_blocks and middle_block (the real checkpoint's key
    list), the hint encoder 3->16->16->32->32->96->96->256->320 (3x3), a 1x1 zero convolution per
    skip and after the middle block."""
    unet = sd2_keys
    prefix = "model.diffusion_model."
    keys = {k[len(prefix):]: v for k, v in unet.items()
            if k.startswith(prefix) and k[len(prefix):].startswith(("time_embed.", "input_blocks.", "middle_block."))}
    widths = [3, 16, 16, 32, 32, 96, 96, 256, 320]
    for i, (a, b) in enumerate(zip(widths, widths[1:])):
        keys[f"input_hint_block.{2 * i}.weight"], keys[f"input_hint_block.{2 * i}.bias"] = [b, a, 3, 3], [b]
    skips = [320] * 4 + [640] * 3 + [1280] * 5
    for i, ch in enumerate(skips):
        keys[f"zero_convs.{i}.0.weight"], keys[f"zero_convs.{i}.0.bias"] = [ch, ch, 1, 1], [ch]
    keys["middle_block_out.0.weight"], keys["middle_block_out.0.bias"] = [1280, 1280, 1, 1], [1280]
    return keys


def test_the_config_builds_the_real_sd21_controlnet_layout(sd2_keys):
    config = OmegaConf.load(ROOT / "configs" / "controlnet" / "cldm_v21.yaml")
    with torch.device("meta"):
        from ldm.util import instantiate_from_config

        net = instantiate_from_config(config.model.params.control_stage_config)
    ours = {k: list(v.shape) for k, v in net.state_dict().items()}
    expected = real_controlnet_keys(sd2_keys)
    assert len(expected) == 340 and ours == expected
    base = OmegaConf.to_container(OmegaConf.load(ROOT / "configs" / "stable-diffusion" / "v2-inference.yaml"))
    derived = controlnet_params(base["model"]["params"]["unet_config"]["params"])
    assert derived == config.model.params.control_stage_config.params  # the base model's own trunk


@pytest.mark.slow
def test_the_controlled_unet_compiles_to_one_graph(tiny_eps_model, nets, inputs):
    """The ControlNets, their window and weights and the UNet taking the residuals: one graph, no
    break (a host sync on the window would be one), as torch.compile sees a guided step."""
    cond, _ = controls(nets, inputs["hints"], [0.8, 0.5], start=0.1, end=0.9, guess_mode=True)
    wrapper = tiny_eps_model.model

    def step(x, t, c):
        return wrapper(x, t, c_crossattn=[c], c_control=cond)

    torch._dynamo.reset()
    with torch.no_grad():
        explanation = torch._dynamo.explain(step)(inputs["x_T"], inputs["t"], inputs["c"])
    assert explanation.graph_break_count == 0, [str(r.reason) for r in explanation.break_reasons]
    assert explanation.graph_count == 1
