"""LoRA files (ldm.lora) against diffusers' load_lora_weights + fuse_lora (with peft) on identical
random weights: a random kohya-format LoRA (text encoder q/k/v/out/fc1/fc2, UNet attention,
projections, feed-forward, resnet 3x3 convolutions "LoCon", time embedding projections, down- and
up-samplers) and a random peft-format one give the same text-encoder and UNet outputs; the
native-MHA layout merges to the same weights; restoring is bit-exact; bad files change nothing.

Tolerance (relative error, L2): 1e-5 on outputs; both sides add the same low-rank product to
float32 weights, in another order of operations (observed ~1e-7).
"""

from __future__ import annotations

import pytest
import torch

from conftest import RANK, diffusers_pipeline_twin, random_kohya, rel_err, tiny_config, tiny_family_model, tiny_model
from ldm.checkpoint import save_state_dict
from ldm.lora import LoraError, merge_loras, model_targets
from ldm.native_mha import to_native

PROMPTS = ["a red cube on a wooden table", "a lighthouse at dusk"]


def random_peft(model, seed: int) -> dict[str, torch.Tensor]:
    """A diffusers/peft-format LoRA (lora_A/lora_B, no alpha) on the attention of UNet and text."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, target in model_targets(model).items():
        if name.startswith(("unet.", "text_encoder.")) and name.endswith(("to_q", "to_v", "to_out.0", "self_attn.k_proj", "mlp.fc2")):
            out, inp = target.weight.shape[:2]
            state[f"{name}.lora_A.weight"] = torch.randn(RANK, inp, generator=gen) / inp**0.5
            state[f"{name}.lora_B.weight"] = torch.randn(out, RANK, generator=gen) / RANK**0.5
    return state


@pytest.fixture(scope="module")
def base():
    return tiny_model("eps", seed=3)


@pytest.fixture(scope="module")
def inputs(base):
    gen = torch.Generator().manual_seed(0)
    tokens = base.cond_stage_model.tokenize(PROMPTS)
    return {"tokens": tokens, "x": torch.randn(2, 4, 8, 8, generator=gen), "t": torch.tensor([999, 421]),
            "c": torch.randn(2, 77, 48, generator=gen)}


def outputs(model, inputs) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return (model.cond_stage_model.encode_with_transformer(inputs["tokens"]),
                model.model.diffusion_model(inputs["x"], inputs["t"], context=inputs["c"]))


def diffusers_outputs(pipe, inputs) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return (pipe.text_encoder(inputs["tokens"]).last_hidden_state,
                pipe.unet(inputs["x"], inputs["t"], inputs["c"]).sample)


@pytest.mark.parametrize("kind, weight", [("kohya", 0.7), ("peft", 1.0)])
def test_a_lora_merges_as_diffusers_fuses_it(base, inputs, tmp_path, kind, weight):
    state = random_kohya(base, 1) if kind == "kohya" else random_peft(base, 2)
    assert len(state) > 40
    save_state_dict(state, tmp_path / "lora.safetensors")
    pipe = diffusers_pipeline_twin(tiny_config(), base)
    pipe.load_lora_weights({k: v.clone() for k, v in state.items()})
    pipe.fuse_lora(lora_scale=weight)
    before = outputs(base, inputs)
    merge = merge_loras(base, [(tmp_path / "lora.safetensors", weight)])
    try:
        ours, theirs = outputs(base, inputs), diffusers_outputs(pipe, inputs)
    finally:
        merge.restore()
    for a, b, plain in zip(ours, theirs, before):
        assert rel_err(a, b) <= 1e-5 and rel_err(a, plain) > 1e-3
    assert all(torch.equal(a, b) for a, b in zip(outputs(base, inputs), before))  # restored bit for bit


def test_restore_is_bit_exact_and_merges_stack(base, tmp_path):
    save_state_dict(random_kohya(base, 4), tmp_path / "a.safetensors")
    save_state_dict(random_peft(base, 5), tmp_path / "b.safetensors")
    original = {k: v.clone() for k, v in base.state_dict().items()}
    merge = merge_loras(base, [(tmp_path / "a.safetensors", 1.0), (tmp_path / "b.safetensors", 0.5)])
    both = {k: v.clone() for k, v in base.state_dict().items()}
    merge = merge_loras(base, [(tmp_path / "a.safetensors", 1.0)], merge)  # switching restores first
    only_a = {k: v.clone() for k, v in base.state_dict().items()}
    merge.restore()
    assert all(torch.equal(v, original[k]) for k, v in base.state_dict().items())
    changed = [k for k in original if not torch.equal(both[k], original[k])]
    assert changed and any(not torch.equal(both[k], only_a[k]) for k in changed)


def test_native_mha_layout_merges_to_the_same_weights(base, tmp_path):
    """q, k and v deltas land in their rows of in_proj_weight (or in q/k/v_proj_weight)."""
    save_state_dict(random_kohya(base, 6), tmp_path / "lora.safetensors")
    native = tiny_model("eps", native_mha=True)
    native.load_state_dict(to_native(base.state_dict()))
    merge = merge_loras(base, [(tmp_path / "lora.safetensors", 1.0)])
    expected = {k: v.clone() for k, v in to_native(base.state_dict()).items()}
    merge.restore()
    merge_loras(native, [(tmp_path / "lora.safetensors", 1.0)])
    got = native.state_dict()
    bad = [(k, (got[k] - v).abs().max().item()) for k, v in expected.items() if not torch.allclose(got[k], v, rtol=0, atol=1e-6)]
    assert not bad, bad[:5]


def test_the_inpainting_unets_9_channel_conv_in(tmp_path):
    model = tiny_family_model("inpainting")
    targets = model_targets(model)
    conv_in = targets["lora_unet_conv_in"]
    assert conv_in.weight.shape[1] == 9 and targets["unet.conv_in"] is conv_in
    down, up = torch.randn(RANK, 9, 3, 3), torch.randn(conv_in.weight.shape[0], RANK, 1, 1)
    save_state_dict({"lora_unet_conv_in.lora_down.weight": down, "lora_unet_conv_in.lora_up.weight": up}, tmp_path / "in.safetensors")
    before = conv_in.weight.clone()
    merge_loras(model, [(tmp_path / "in.safetensors", 0.5)])
    expected = before + 0.5 * (up.flatten(1) @ down.flatten(1)).reshape(before.shape)
    assert torch.allclose(conv_in.weight, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("case, message", [
    ("sd15", "a LoRA for SD 1.x"),
    ("sdxl", "for SDXL"),
    ("unknown", "match none of this model's"),
    ("shape", "the model's weight is"),
    ("loha", "is a LoHa file"),
    ("not lora", "not LoRA tensors"),
])
def test_bad_files_are_explained_and_change_nothing(base, tmp_path, case, message):
    good = random_kohya(base, 7)
    save_state_dict(good, tmp_path / "good.safetensors")
    q = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    bad = dict(good)
    if case == "sd15":
        bad[f"{q}.lora_down.weight"] = torch.randn(RANK, 768)
    elif case == "sdxl":
        bad = {k.replace("lora_te_", "lora_te2_"): v for k, v in good.items()}
    elif case == "unknown":
        bad["lora_unet_down_blocks_9_attentions_0_proj_in.lora_down.weight"] = torch.randn(RANK, 8)
        bad["lora_unet_down_blocks_9_attentions_0_proj_in.lora_up.weight"] = torch.randn(8, RANK)
    elif case == "shape":
        bad[f"{q}.lora_up.weight"] = torch.randn(5, RANK)
    elif case == "loha":
        bad = {f"{q}.hada_w1_a": torch.randn(4, 4)}
    else:
        bad = {"weight": torch.randn(3)}
    save_state_dict(bad, tmp_path / "bad.safetensors")
    original = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(LoraError, match=message):
        merge_loras(base, [(tmp_path / "good.safetensors", 1.0), (tmp_path / "bad.safetensors", 1.0)])
    assert all(torch.equal(v, original[k]) for k, v in base.state_dict().items())
