"""The native-MHA weight layout (ldm/native_mha.py): conversion both ways, and that a converted
model computes what the original-layout model computes.

Tolerances: the two layouts run the same float32 arithmetic except for how the attention is
fused (vanilla matmul-softmax vs SDPA, packed vs separate projections), so outputs agree to
float32 rounding: ~1e-6 relative on the tiny model; 1e-5 leaves room for other CPUs' kernels.
Weight conversion itself is exact (torch.equal).
"""

from __future__ import annotations

import pytest
import torch

from conftest import assert_close, tiny_config, tiny_family_model, tiny_model
from ldm.checkpoint import CheckpointError, apply_state_dict
from ldm.loading import load_model_from_config
from ldm.models.diffusion.ddim import DDIMSampler
from ldm.modules.attention import set_attention_implementation
from ldm.native_mha import (
    NATIVE,
    ORIGINAL,
    AlreadyConverted,
    ConversionError,
    attention_difference,
    convert_state_dict,
    detect_layout,
    to_native,
    to_original,
)

UNET = "model.diffusion_model."
SELF = UNET + "input_blocks.1.1.transformer_blocks.0.attn1."
CROSS = UNET + "input_blocks.1.1.transformer_blocks.0.attn2."
RTOL = 1e-5


@pytest.fixture(scope="module")
def original_model():
    return tiny_model()


@pytest.fixture(scope="module")
def original_state(original_model) -> dict[str, torch.Tensor]:
    return original_model.state_dict()


@pytest.fixture(scope="module")
def native_model(original_state):
    model = tiny_model(native_mha=True, seed=1)  # other weights, overwritten below
    apply_state_dict(model, to_native(original_state))
    return model


def test_converted_state_dict_is_the_native_model_layout(original_state):
    converted, report = convert_state_dict(original_state, NATIVE)
    native = tiny_model(native_mha=True).state_dict()
    assert list(converted) != list(original_state)
    assert converted.keys() == native.keys()
    assert {k: (v.shape, v.dtype) for k, v in converted.items()} == {k: (v.shape, v.dtype) for k, v in native.items()}
    assert (report.self_attention, report.cross_attention) == (7, 7)
    # The exact tensors of the documented layout.
    q, k, v = (original_state[SELF + f"to_{n}.weight"] for n in "qkv")
    assert torch.equal(converted[SELF + "in_proj_weight"], torch.cat([q, k, v]))
    for n in "qkv":
        assert torch.equal(converted[CROSS + f"{n}_proj_weight"], original_state[CROSS + f"to_{n}.weight"])
    for prefix in (SELF, CROSS):
        assert torch.equal(converted[prefix + "in_proj_bias"], torch.zeros(3 * q.shape[0]))
        assert converted[prefix + "out_proj.weight"] is original_state[prefix + "to_out.0.weight"]
        assert converted[prefix + "out_proj.bias"] is original_state[prefix + "to_out.0.bias"]
    untouched = [k for k in original_state if ".attn1." not in k and ".attn2." not in k]
    assert report.passed_through == len(untouched)
    assert all(converted[k] is original_state[k] for k in untouched)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_round_trip_is_bit_exact(original_state, dtype):
    state = {k: v.to(dtype) for k, v in original_state.items()}
    native = to_native(state)
    assert native[SELF + "in_proj_bias"].dtype == dtype
    back = to_original(native)
    assert back.keys() == state.keys()
    for k, v in state.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    # Split tensors own their storage (no view into the packed weight), as in the original file.
    assert back[SELF + "to_k.weight"].untyped_storage().nbytes() == back[SELF + "to_k.weight"].nbytes


def test_unet_outputs_match(original_model, native_model):
    unet, native_unet = original_model.model.diffusion_model, native_model.model.diffusion_model
    gen = torch.Generator().manual_seed(1)
    x, context = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 5, 48, generator=gen)
    t = torch.tensor([10, 900])
    with torch.no_grad():
        set_attention_implementation(unet, "vanilla")
        expected = unet(x, t, context)
        assert_close(native_unet(x, t, context), expected, RTOL)


def test_ddim_sampling_with_guidance_matches(original_model, native_model):
    cond = original_model.get_learned_conditioning(["a red cube"])
    uncond = original_model.get_learned_conditioning([""])
    set_attention_implementation(original_model, "vanilla")
    results = []
    for model in (original_model, native_model):
        x_T = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
        torch.manual_seed(0)
        samples, _ = DDIMSampler(model).sample(
            S=5, batch_size=1, shape=(4, 8, 8), conditioning=cond, unconditional_guidance_scale=7.5,
            unconditional_conditioning=uncond, eta=0.0, x_T=x_T, verbose=False,
        )
        results.append(samples)
    assert_close(results[1], results[0], RTOL)


def test_bare_unet_state_dict_converts(original_model):
    native_unet = tiny_model(native_mha=True).model.diffusion_model
    state = to_native(original_model.model.diffusion_model.state_dict())
    native_unet.load_state_dict(state, strict=True)
    assert detect_layout(state) == NATIVE


def test_ema_and_other_keys_are_untouched(original_state):
    extra = {
        "model_ema.decay": torch.tensor(0.9999),
        "model_ema.diffusion_modelinput_blocks11transformer_blocks0attn1to_qweight": torch.ones(2, 2),
        "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight": torch.ones(6, 2),
    }
    converted = to_native({**original_state, **extra})
    assert all(converted[k] is v for k, v in extra.items())


def test_detect_layout(original_state):
    native = to_native(original_state)
    assert detect_layout(original_state) == ORIGINAL
    assert detect_layout(native) == NATIVE
    mixed = {**original_state, **{k: v for k, v in native.items() if k.startswith(SELF)}}
    for k in [k for k in mixed if k.startswith(SELF + "to_")]:
        del mixed[k]
    with pytest.raises(ConversionError, match="mixes layouts"):
        detect_layout(mixed)
    with pytest.raises(ConversionError, match="no UNet attention"):
        detect_layout([k for k in original_state if not k.startswith(UNET)])


def test_already_in_target_layout(original_state):
    with pytest.raises(AlreadyConverted, match="already in the original layout"):
        convert_state_dict(original_state, ORIGINAL)
    with pytest.raises(AlreadyConverted, match="already in the native-MHA layout"):
        convert_state_dict(to_native(original_state), NATIVE)


def test_reverse_refuses_nonzero_in_proj_bias(original_state):
    native = to_native(original_state)
    native[CROSS + "in_proj_bias"] = native[CROSS + "in_proj_bias"].clone()
    native[CROSS + "in_proj_bias"][3] = 0.5
    with pytest.raises(ConversionError, match=r"attn2\.in_proj_bias is not zero \(max \|value\| 0\.5\)"):
        to_original(native)


def test_incomplete_or_unknown_attention_tensors_are_refused(original_state):
    incomplete = {k: v for k, v in original_state.items() if k != CROSS + "to_v.weight"}
    with pytest.raises(ConversionError, match=r"attn2 is not in a convertible form: missing .*to_v\.weight"):
        to_native(incomplete)
    with pytest.raises(ConversionError, match=r"unexpected .*to_q\.bias"):
        to_native({**original_state, SELF + "to_q.bias": torch.zeros(32)})


def test_verification_detects_a_wrong_mapping(original_state):
    native = to_native(original_state)
    diff, rel = attention_difference(original_state, native, CROSS)
    assert rel < 1e-6
    swapped = {**native, CROSS + "k_proj_weight": native[CROSS + "v_proj_weight"], CROSS + "v_proj_weight": native[CROSS + "k_proj_weight"]}
    assert attention_difference(original_state, swapped, CROSS)[1] > 1e-2
    _, report = convert_state_dict(original_state, NATIVE, verify=True)
    assert report.max_rel_diff < 1e-6


def test_loader_names_the_conversion_command(tiny_files, tmp_path, original_state):
    with pytest.raises(CheckpointError) as e:
        load_model_from_config(tiny_config(native_mha=True), tiny_files["safetensors"])
    assert "`python tools/convert_native_mha.py IN OUT`" in str(e.value)
    assert "--reverse" not in str(e.value)

    from ldm.checkpoint import save_state_dict

    native_file = tmp_path / "native.safetensors"
    save_state_dict(to_native(original_state), native_file)
    with pytest.raises(CheckpointError) as e:
        load_model_from_config(tiny_config(), native_file)
    assert "`python tools/convert_native_mha.py --reverse IN OUT`" in str(e.value)
    loaded = load_model_from_config(tiny_config(native_mha=True), native_file).state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in to_native(original_state).items())


# -- inpainting and depth families: the converter serves their *_native_mha.yaml twins
@pytest.mark.parametrize("family", ["inpainting", "depth"])
def test_family_checkpoint_converts_and_computes_the_same(request, family):
    """Only the UNet's attention changes layout: the MiDaS ViT's own attention (``attn.qkv``) and
    every other tensor pass through; the converted model makes the same prediction."""
    model = request.getfixturevalue("tiny_inpaint_model" if family == "inpainting" else "tiny_depth_model")
    state = model.state_dict()
    converted, report = convert_state_dict(state, NATIVE, verify=True)
    assert (report.self_attention, report.cross_attention) == (7, 7) and report.max_rel_diff < RTOL
    assert all(converted[k] is v for k, v in state.items() if not k.startswith(UNET))
    native = tiny_family_model(family, native_mha=True, seed=1)
    apply_state_dict(native, converted)
    gen = torch.Generator().manual_seed(2)
    x, c_concat = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 5 if family == "inpainting" else 1, 8, 8, generator=gen)
    cond = {"c_concat": [c_concat], "c_crossattn": [torch.randn(2, 5, 48, generator=gen)]}
    t = torch.tensor([10, 900])
    with torch.no_grad():
        assert_close(native.apply_model(x, t, cond), model.apply_model(x, t, cond), RTOL)
    assert torch.equal(to_original(converted)[UNET + "input_blocks.0.0.weight"], state[UNET + "input_blocks.0.0.weight"])
