"""The tensor names of :mod:`ldm.diffusers_format.names` at full SD2 size, against diffusers' own
single-file converters and the modules diffusers and transformers build for SD2.

Every tensor of the real text-to-image and inpainting checkpoints (the key and shape lists in
tests/fixtures/checkpoint-keys/) is a meta tensor here, so nothing is allocated. UNet and VAE: each diffusers name must
hold the very tensor (or a view of it) that diffusers' converter puts there, so two tensors of
the same shape swapped would fail; the way back must give every original name its own tensor.
Text encoder: names and shapes (diffusers' converter copies the q/k/v parts); its values are
compared on the tiny model in test_convert.py.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from conftest import CONFIGS, family_keys
from ldm.diffusers_format import names
from ldm.diffusers_format.configs import unet_layout, vae_layout
from ldm.diffusers_format.names import TEXT, UNET, VAE


@pytest.fixture(scope="module", params=["v2-inference.yaml", "v2-inpainting-inference.yaml"])
def sd2(request):
    """(config, meta state dict) of a real SD2 checkpoint."""
    keys = family_keys("sd2" if request.param == "v2-inference.yaml" else "inpainting")
    return OmegaConf.load(CONFIGS / request.param), {k: torch.empty(shape, device="meta") for k, shape in keys.items()}


def part(state, prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def origins(converted, state) -> dict[str, str]:
    """The original name of the tensor each converted name holds (itself, or the base of a view)."""
    by_id = {id(v): k for k, v in state.items()}
    found = {k: by_id.get(id(v), by_id.get(id(v._base))) for k, v in converted.items()}
    assert None not in found.values()
    return found


def shapes(state) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in state.items()}


def test_unet_names_are_diffusers(sd2):
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, create_unet_diffusers_config_from_ldm

    config, state = sd2
    dconfig = create_unet_diffusers_config_from_ldm(OmegaConf.to_container(config), state)
    theirs = convert_ldm_unet_checkpoint(state, dconfig)
    ours = names.unet_to_diffusers(part(state, UNET), unet_layout(config))
    assert len(ours) == len(part(state, UNET)) == 686
    assert origins(ours, state) == origins(theirs, state)
    with torch.device("meta"):
        model = UNet2DConditionModel(**dconfig)
    assert shapes(ours) == shapes(model.state_dict())
    back = names.unet_to_original(ours, unet_layout(config))
    assert back.keys() == {k for k in state if k.startswith(UNET)} and all(back[k] is state[k] for k in back)


def test_vae_names_are_diffusers(sd2):
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint, create_vae_diffusers_config_from_ldm

    config, state = sd2
    dconfig = create_vae_diffusers_config_from_ldm(OmegaConf.to_container(config), state)
    theirs = convert_ldm_vae_checkpoint(state, dconfig)
    ours = names.vae_to_diffusers(part(state, VAE), vae_layout(config))
    assert len(ours) == len(part(state, VAE)) == 248
    assert origins(ours, state) == origins(theirs, state)
    with torch.device("meta"):
        model = AutoencoderKL(**dconfig)
    assert shapes(ours) == shapes(model.state_dict())  # the attention's 1x1 convolutions as linear layers
    back = names.vae_to_original(ours, vae_layout(config))
    assert back.keys() == {k for k in state if k.startswith(VAE)}
    assert origins(back, state) == {k: k for k in back} and shapes(back) == shapes({k: state[k] for k in back})


def test_text_names_are_transformers(sd2):
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel

    _, state = sd2
    unused = (f"{TEXT}transformer.resblocks.23.", f"{TEXT}text_projection", f"{TEXT}logit_scale")
    used = {k: v for k, v in state.items() if k.startswith(TEXT) and not k.startswith(unused)}
    assert len(part(state, TEXT)) - len(used) == 14  # the last layer's 12 tensors, the projection, logit_scale
    theirs = convert_open_clip_checkpoint(SimpleNamespace(config=SimpleNamespace(hidden_size=1024)), state)
    theirs = {k: v for k, v in theirs.items() if k != "text_projection.weight"}  # CLIPTextModel has none
    ours = names.text_to_diffusers(part(used, TEXT), 23)
    assert shapes(ours) == shapes(theirs)
    with torch.device("meta"):
        model = CLIPTextModel(CLIPTextConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                                             num_attention_heads=16, hidden_act="gelu"))
    assert shapes({k.removeprefix("text_model."): v for k, v in ours.items()}) == shapes(
        {k.removeprefix("text_model."): v for k, v in model.state_dict().items() if not k.endswith("position_ids")})
    assert shapes(names.text_to_original(ours, 23)) == shapes(used)


def test_names_outside_the_layout_are_an_error():
    layout = names.Layout(2, 1, (True, True))
    with pytest.raises(names.DiffusersFormatError, match="1 UNet tensors have no counterpart.*down_blocks.5.resnets.0.conv1.weight"):
        names.unet_to_original({"down_blocks.5.resnets.0.conv1.weight": torch.zeros(1)}, layout)
    with pytest.raises(names.DiffusersFormatError, match="text encoder layer 0: its q_proj, k_proj and v_proj weights"):
        names.text_to_original({"text_model.encoder.layers.0.self_attn.q_proj.weight": torch.zeros(1)}, 1)
