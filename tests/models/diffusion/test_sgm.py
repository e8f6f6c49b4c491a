"""SD-Turbo's generative-models ("sgm") layout (ldm/models/diffusion/sgm.py, sd-turbo.yaml).

The full-size config must hold exactly the tensors of SD-Turbo's single file (the SD2 checkpoint's,
the text encoder under conditioner.embedders.0, denoiser.sigmas, no schedule buffers). The layout
is a pure renaming: a tiny sgm file made from the tiny SD2 model's tensors loads strictly and
computes bit for bit what the SD2 model computes. Files of the other layout, or with another
schedule's sigmas, are refused with a message naming the cause.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from conftest import CONFIGS, assert_computes_as, load_script, tiny_config, tiny_sgm_config
from ldm.checkpoint import CheckpointError, apply_state_dict, load_state_dict, save_state_dict
from ldm.generation.model import Model, read_config
from ldm.generation.serving import served_tasks
from ldm.generation.settings import ModelSettings, SamplingSettings
from ldm.generation.tasks.img2img import Img2ImgPipeline
from ldm.generation.tasks.txt2img import Txt2ImgPipeline
from ldm.loading import build_model, load_model_from_config
from ldm.models.diffusion.sgm import SGMLatentDiffusion
from ldm.native_mha import to_native

TEXT_ENCODER = ("cond_stage_model.", "conditioner.embedders.0.")


def sd_turbo_sigmas() -> torch.Tensor:
    """``denoiser.sigmas`` as generative-models computes them for SD2's schedule: float64 alphas_cumprod
    of betas linear in sqrt(beta) from 0.00085 to 0.012, the ratio rounded to float32, then its root."""
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    alphas_cumprod = np.cumprod(1.0 - betas)
    return torch.tensor((1.0 - alphas_cumprod) / alphas_cumprod, dtype=torch.float32) ** 0.5


def to_sgm(state: dict) -> dict:
    """An SD2 (ldm-layout) state dict in SD-Turbo's layout: the root's schedule buffers dropped, the
    text encoder renamed, ``denoiser.sigmas`` added."""
    out = {k.replace(*TEXT_ENCODER, 1) if k.startswith(TEXT_ENCODER[0]) else k: v for k, v in state.items() if "." in k}
    out["denoiser.sigmas"] = sd_turbo_sigmas()
    return out


@pytest.fixture(scope="module")
def sgm_file(tiny_eps_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("sgm") / "tiny-sd-turbo.safetensors"
    save_state_dict(to_sgm(tiny_eps_model.state_dict()), path)
    return path


@pytest.fixture(scope="module")
def sgm_ckpt(sgm_file):
    """The same tensors as a torch.save file. Bit-exact comparisons load this one: safetensors packs
    tensors without padding, so their addresses (and with them the CPU kernels' rounding, by ~1e-7)
    depend on the key names, which differ between the layouts; torch.save aligns every tensor."""
    path = sgm_file.with_suffix(".ckpt")
    save_state_dict(load_state_dict(sgm_file), path)
    return path


@pytest.fixture(scope="module")
def sgm_model(sgm_ckpt):
    return load_model_from_config(tiny_sgm_config(), sgm_ckpt)


# -- the full-size config --------------------------------------------------------------------
@pytest.mark.parametrize("native", [False, True], ids=["original", "native-mha"])
def test_sd_turbo_config_holds_exactly_the_sd_turbo_tensors(native, sd2_keys):
    expected = to_sgm({k: torch.empty(shape, device="meta") for k, shape in sd2_keys.items()})
    assert len(expected) == len(sd2_keys) - 12 + 1
    if native:
        expected = to_native(expected)
    model = build_model(CONFIGS / ("sd-turbo_native_mha.yaml" if native else "sd-turbo.yaml"), "meta")
    own = {k: list(v.shape) for k, v in model.state_dict().items()}
    expected = {k: list(v.shape) for k, v in expected.items()}
    assert sorted(own.keys() - expected.keys()) == [], "tensors SD-Turbo's file lacks"
    assert sorted(expected.keys() - own.keys()) == [], "tensors of SD-Turbo's file the model lacks"
    assert {k: (own[k], expected[k]) for k in own if own[k] != expected[k]} == {}, "shapes differ (model, file)"
    assert isinstance(model, SGMLatentDiffusion) and model.parameterization == "eps" and model.image_size == 64
    assert not model.use_ema and all(p.is_meta for p in model.parameters())
    # The schedule is real from the start (it is in no file), float32, on the CPU.
    assert model.alphas_cumprod.device.type == "cpu" and model.alphas_cumprod.dtype == torch.float32
    apply_state_dict(model, {k: torch.empty(s, dtype=torch.float16, device="meta") for k, s in expected.items()},
                     assign=True)


def test_sd_turbo_config_keeps_its_sampling_defaults_beside_the_model():
    for name in ("sd-turbo.yaml", "sd-turbo_native_mha.yaml"):
        config = read_config(CONFIGS / name)
        assert dict(config.sampling) == {"sampler": "euler_ancestral", "schedule": "trailing", "steps": 1, "scale": 1.0,
                                         "img2img": {"steps": 2, "strength": 0.5}}


# -- the tiny model: a pure renaming of the SD2 layout -----------------------------------------
def test_text_encoder_lives_in_the_conditioner():
    model = build_model(tiny_sgm_config(), "meta")
    assert model.cond_stage_model is model.conditioner.embedders[0]
    assert "cond_stage_model" not in dict(model.named_children())
    replacement = build_model(tiny_config(), "meta").cond_stage_model
    model.cond_stage_model = replacement
    assert model.conditioner.embedders[0] is replacement and len(model.conditioner.embedders) == 1


def test_sgm_file_loads_strictly_and_computes_what_the_sd2_model_computes(sgm_model, sgm_file, tiny_eps_model):
    assert not sgm_model.training
    meta = [n for n, t in [*sgm_model.named_parameters(), *sgm_model.named_buffers()] if t.is_meta]
    assert meta == []
    assert_computes_as(sgm_model, tiny_eps_model)
    # Saving writes the layout it was loaded from.
    saved, file = sgm_model.state_dict(), load_state_dict(sgm_file)
    assert saved.keys() == file.keys() and all(torch.equal(saved[k], file[k]) for k in file)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_schedule_is_latent_diffusions_float32_and_real_after_loading(sgm_file, tiny_eps_model, dtype):
    model = load_model_from_config(tiny_sgm_config(), sgm_file, dtype=dtype)
    assert model.model.diffusion_model.out[2].weight.dtype == dtype
    reference = dict(tiny_eps_model.named_buffers())
    schedule = [name for name in reference if "." not in name]
    assert len(schedule) == 12
    for name in schedule:
        buffer = model.get_buffer(name)
        assert buffer.dtype == torch.float32 and buffer.device.type == "cpu" and torch.equal(buffer, reference[name]), name
    assert model.denoiser.sigmas.dtype == torch.float32 and torch.equal(model.denoiser.sigmas, sd_turbo_sigmas())


def test_half_precision_file_loads_with_its_rounded_sigmas(sgm_file, tmp_path):
    half = {k: v.half() for k, v in load_state_dict(sgm_file).items()}
    save_state_dict(half, tmp_path / "half.safetensors")
    model = load_model_from_config(tiny_sgm_config(), tmp_path / "half.safetensors")
    assert torch.equal(model.denoiser.sigmas, half["denoiser.sigmas"].float())


# -- refusals ----------------------------------------------------------------------------------
def test_sigmas_of_another_schedule_are_refused(sgm_file, tmp_path):
    state = load_state_dict(sgm_file)
    state["denoiser.sigmas"] = state["denoiser.sigmas"] * (1 + 1e-4)
    save_state_dict(state, tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match="other.safetensors: .*denoiser.sigmas disagree with the config's noise schedule"):
        load_model_from_config(tiny_sgm_config(), tmp_path / "other.safetensors")
    # The same check without the loader: plain load_state_dict into a built model.
    model = build_model(tiny_sgm_config(), "cpu")
    with pytest.raises(CheckpointError, match="at 1000 of 1000 timesteps"):
        model.load_state_dict(state)


def test_a_config_of_another_schedule_refuses_the_file(sgm_file):
    config = tiny_sgm_config()
    config.model.params.linear_end = 0.02  # SD 1's and the x4 upscaler's end, not SD2's
    with pytest.raises(CheckpointError, match=r"denoiser.sigmas disagree .* linear_start and linear_end"):
        load_model_from_config(config, sgm_file)


def test_sgm_file_given_to_the_sd2_config_names_sd_turbo_yaml(sgm_file, tiny_files):
    with pytest.raises(CheckpointError) as err:
        load_model_from_config(tiny_files["config"], sgm_file)
    message = str(err.value)
    assert "conditioner.embedders.0." in message and "denoiser.sigmas" in message  # unexpected
    assert "cond_stage_model." in message and "alphas_cumprod" in message  # missing
    assert "use configs/stable-diffusion/sd-turbo.yaml" in message.splitlines()[-1]


def test_sd2_file_given_to_the_sd_turbo_config_names_the_sd2_configs(tiny_files):
    with pytest.raises(CheckpointError) as err:
        load_model_from_config(tiny_sgm_config(), tiny_files["safetensors"])
    note = str(err.value).splitlines()[-1]
    assert note.startswith("The config is for SD-Turbo") and "original layout" in note
    assert "configs/stable-diffusion/v2-inference.yaml" in note and "v2-inference-v.yaml" in note


@pytest.mark.parametrize("config", ["v2-inference.yaml", "sd-turbo.yaml"])
def test_full_size_file_of_the_other_layout_names_the_right_config(config, sd2_keys):
    ldm = {k: torch.empty(shape, device="meta") for k, shape in sd2_keys.items()}
    state = to_sgm(ldm) if config == "v2-inference.yaml" else ldm
    with pytest.raises(CheckpointError) as err:
        apply_state_dict(build_model(CONFIGS / config, "meta"), state, assign=True)
    right = "sd-turbo.yaml" if config == "v2-inference.yaml" else "v2-inference.yaml"
    assert f"configs/stable-diffusion/{right}" in str(err.value).splitlines()[-1]


# -- the native-MHA twin and the tasks -----------------------------------------------------------
def test_native_mha_conversion_of_an_sgm_file_round_trips(sgm_file, sgm_model, tmp_path):
    tool = load_script("tools/convert_native_mha.py")
    native, back = tmp_path / "native.safetensors", tmp_path / "back.safetensors"
    assert tool.main([str(sgm_file), str(native), "--verify"]) == 0
    assert tool.main(["--reverse", str(native), str(back)]) == 0
    original, returned = load_state_dict(sgm_file), load_state_dict(back)
    assert original.keys() == returned.keys() and all(torch.equal(original[k], returned[k]) for k in original)
    model = load_model_from_config(tiny_sgm_config(native_mha=True), native)
    x, t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([500])
    c = torch.randn(1, 5, 48, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = sgm_model.apply_model(x, t, c)
        assert (model.apply_model(x, t, c) - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_txt2img_and_img2img_serve_the_sgm_model(sgm_ckpt, tiny_files, tmp_path):
    OmegaConf.save(tiny_sgm_config(), tmp_path / "tiny-sd-turbo.yaml")

    def images(config, ckpt) -> torch.Tensor:
        model = Model(ModelSettings(config=config, ckpt=ckpt, device="cpu", precision="full"))
        assert served_tasks(model) == ["txt2img", "img2img"]
        Img2ImgPipeline(model, SamplingSettings(steps=2), torch.zeros(1, 3, 16, 16))
        pipeline = Txt2ImgPipeline(model, SamplingSettings(steps=2), height=16, width=16)
        torch.manual_seed(0)
        pipeline.start()
        return pipeline(["a red cube"])

    assert torch.equal(images(tmp_path / "tiny-sd-turbo.yaml", sgm_ckpt), images(tiny_files["config"], tiny_files["ckpt"]))
