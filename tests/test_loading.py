"""Model construction on the meta device and loading from files (``ldm.loading``).

The official configs must build this package and hold exactly the tensors of a real SD2
checkpoint (text-to-image, x4 upscaler, unCLIP-L and -H; the native-MHA twins exactly the
converted tensors); loading the tiny checkpoints must reproduce the models that wrote them,
bit for bit.
"""

from __future__ import annotations

import pytest
import torch

from conftest import CONFIGS, FAMILY_CONFIGS, assert_computes_as, family_keys, tiny_config, tiny_unclip_config, tiny_x4_config
from ldm.checkpoint import CheckpointError, apply_state_dict, save_state_dict
from ldm.loading import build_model, load_config, load_model_from_config

OFFICIAL = ["v2-inference.yaml", "v2-inference-v.yaml"]


@pytest.fixture(scope="module", params=OFFICIAL)
def official_meta_model(request):
    return request.param, build_model(CONFIGS / request.param, "meta")


def test_official_config_holds_exactly_the_sd2_tensors(official_meta_model, sd2_keys):
    name, model = official_meta_model
    own = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert sorted(own.keys() - sd2_keys.keys()) == [], f"{name}: tensors a real checkpoint lacks"
    assert sorted(sd2_keys.keys() - own.keys()) == [], f"{name}: checkpoint tensors the model lacks"
    wrong = {k: (own[k], sd2_keys[k]) for k in own if own[k] != sd2_keys[k]}
    assert wrong == {}, f"{name}: shapes differ (model, checkpoint)"


def test_official_config_parameterization(official_meta_model):
    name, model = official_meta_model
    assert model.parameterization == ("v" if name.endswith("-v.yaml") else "eps")
    assert model.scale_factor == 0.18215 and model.num_timesteps == 1000


def test_meta_build_allocates_no_weights(official_meta_model):
    _, model = official_meta_model
    assert all(p.is_meta for p in model.parameters())
    # Only the schedule (and the text tower's causal mask) is real: it is not in a
    # checkpoint's parameters, or is recomputed, and is tiny.
    real = [n for n, b in model.named_buffers() if not b.is_meta]
    assert sum(model.get_buffer(n).numel() for n in real) < 20_000


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_sd2_layout_state_dict_loads_strictly_into_meta_model(dtype, sd2_keys):
    model = build_model(CONFIGS / "v2-inference.yaml", "meta")
    state = {k: torch.empty(shape, dtype=dtype, device="meta") for k, shape in sd2_keys.items()}
    apply_state_dict(model, state, strict=True, assign=True)
    # assign=True adopts the given tensors (their dtype included) instead of copying into the meta ones.
    assert all(p.dtype == dtype for p in model.parameters())


def test_sd2_layout_with_one_wrong_shape_is_refused(sd2_keys):
    model = build_model(CONFIGS / "v2-inference.yaml", "meta")
    state = {k: torch.empty(shape, device="meta") for k, shape in sd2_keys.items()}
    key = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    state[key] = torch.empty(320, 768, device="meta")
    with pytest.raises(CheckpointError, match="shape mismatches") as err:
        apply_state_dict(model, state, assign=True)
    assert key in str(err.value)


@pytest.mark.parametrize("fmt", ["safetensors", "ckpt"])
def test_load_model_from_config_reproduces_the_saved_model(fmt, tiny_files, tiny_eps_model):
    model = load_model_from_config(tiny_files["config"], tiny_files[fmt])
    assert not model.training
    meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    assert meta == []
    ref_state = tiny_eps_model.state_dict()
    state = model.state_dict()
    assert state.keys() == ref_state.keys()
    assert all(torch.equal(state[k], ref_state[k]) for k in state)

    assert_computes_as(model, tiny_eps_model)


def test_load_model_from_config_half_keeps_the_schedule_in_float32(tiny_files, tiny_eps_model):
    model = load_model_from_config(tiny_files["config"], tiny_files["safetensors"], dtype=torch.float16)
    assert model.model.diffusion_model.out[2].weight.dtype == torch.float16
    assert model.first_stage_model.decoder.conv_out.weight.dtype == torch.float16
    # The sampler constants derive from the schedule: rounding it to fp16 would change every image.
    assert model.alphas_cumprod.dtype == torch.float32
    assert torch.equal(model.alphas_cumprod, tiny_eps_model.alphas_cumprod)


def test_half_checkpoint_loads_into_a_float32_model_with_a_float32_schedule(tiny_files, tiny_eps_model, tmp_path):
    """Community fp16 files store the schedule in fp16 too: like the original (which copies
    into float32 buffers) we keep float32 tensors holding the file's values."""
    half = {k: v.half() if v.is_floating_point() else v for k, v in tiny_eps_model.state_dict().items()}
    save_state_dict(half, tmp_path / "half.safetensors")
    model = load_model_from_config(tiny_files["config"], tmp_path / "half.safetensors")
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert model.alphas_cumprod.dtype == torch.float32
    assert torch.equal(model.alphas_cumprod, half["alphas_cumprod"].float())


def test_load_model_from_config_names_the_file_on_mismatch(tiny_files, tmp_path):
    cfg = tiny_config()
    cfg.model.params.unet_config.params.in_channels = 9
    with pytest.raises(CheckpointError, match="tiny.safetensors") as err:
        load_model_from_config(cfg, tiny_files["safetensors"])
    assert "input_blocks.0.0.weight" in str(err.value)


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")


# -- inpainting and depth families: the real layouts, and their native-MHA twins through the converter
@pytest.fixture(scope="module", params=["inpainting", "depth"])
def family_meta_model(request):
    return request.param, build_model(CONFIGS / FAMILY_CONFIGS[request.param], "meta")


def assert_same_layout(model, expected: dict[str, list[int]]) -> None:
    own = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert sorted(own.keys() - expected.keys()) == [], "tensors a real checkpoint lacks"
    assert sorted(expected.keys() - own.keys()) == [], "checkpoint tensors the model lacks"
    assert {k: (own[k], expected[k]) for k in own if own[k] != expected[k]} == {}, "shapes differ (model, checkpoint)"


def test_family_config_holds_exactly_the_real_tensors(family_meta_model):
    family, model = family_meta_model
    assert_same_layout(model, family_keys(family))
    assert model.parameterization == "eps" and model.scale_factor == 0.18215
    assert model.model.conditioning_key == "hybrid"


@pytest.mark.parametrize("family", ["inpainting", "depth"])
def test_native_mha_twin_holds_the_converted_real_tensors(family):
    from ldm.native_mha import to_native

    real = {k: torch.empty(shape, device="meta") for k, shape in family_keys(family).items()}
    native = build_model(CONFIGS / FAMILY_CONFIGS[family].replace(".yaml", "_native_mha.yaml"), "meta")
    assert_same_layout(native, {k: list(v.shape) for k, v in to_native(real).items()})


def test_family_layout_loads_strictly_into_meta_model(family_meta_model):
    family, model = family_meta_model
    state = {k: torch.empty(shape, dtype=torch.float16, device="meta") for k, shape in family_keys(family).items()}
    apply_state_dict(model, state, strict=True, assign=True)
    assert all(p.dtype == torch.float16 for p in model.parameters())


# -- upscaler and unCLIP families ------------------------------------------------------------
UPSCALE_UNCLIP_CONFIGS = {
    "x4-upscaler": "x4-upscaling.yaml",
    "unclip-l": "v2-1-stable-unclip-l-inference.yaml",
    "unclip-h": "v2-1-stable-unclip-h-inference.yaml",
}


@pytest.mark.parametrize("native", [False, True], ids=["original", "native-mha"])
@pytest.mark.parametrize("family", sorted(UPSCALE_UNCLIP_CONFIGS))
def test_family_config_holds_exactly_the_checkpoint_tensors(family, native):
    from ldm.native_mha import to_native

    name = UPSCALE_UNCLIP_CONFIGS[family].replace(".yaml", "_native_mha.yaml" if native else ".yaml")
    model = build_model(CONFIGS / name, "meta")
    expected = family_keys(family)
    if native:
        converted = to_native({k: torch.empty(shape, device="meta") for k, shape in expected.items()})
        expected = {k: list(v.shape) for k, v in converted.items()}
    own = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert sorted(own.keys() - expected.keys()) == [], f"{name}: tensors a real checkpoint lacks"
    assert sorted(expected.keys() - own.keys()) == [], f"{name}: checkpoint tensors the model lacks"
    assert {k: (own[k], expected[k]) for k in own if own[k] != expected[k]} == {}, f"{name}: shapes differ"
    assert model.parameterization == "v" and all(p.is_meta for p in model.parameters())
    state = {k: torch.empty(shape, dtype=torch.float16, device="meta") for k, shape in expected.items()}
    apply_state_dict(model, state, strict=True, assign=True)


@pytest.mark.parametrize("family", ["x4", "unclip-l"])
def test_family_model_loads_from_file_and_keeps_its_noise_schedules_float32(family, tmp_path, tiny_x4_model,
                                                                             tiny_unclip_models, tiny_clip_stats):
    """Loaded in half precision, the weights are float16 but the conditioning augmentations'
    schedules and embedding statistics stay the float32 values they were (the noised inputs must
    not depend on the weights' dtype); in float32 the model is the one that was saved."""
    if family == "x4":
        model, config, augmentation = tiny_x4_model, tiny_x4_config(), "low_scale_model"
    else:
        model, config, augmentation = tiny_unclip_models["l"], tiny_unclip_config("l", tiny_clip_stats), "noise_augmentor"
    save_state_dict(model.state_dict(), tmp_path / "tiny.safetensors")
    loaded = load_model_from_config(config, tmp_path / "tiny.safetensors")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())
    half = load_model_from_config(config, tmp_path / "tiny.safetensors", dtype=torch.float16)
    assert half.model.diffusion_model.label_emb.state_dict().popitem()[1].dtype == torch.float16
    for name, buffer in model.get_submodule(augmentation).named_buffers():
        kept = half.get_submodule(augmentation).get_buffer(name)
        assert kept.dtype == torch.float32 and torch.equal(kept, buffer), name
