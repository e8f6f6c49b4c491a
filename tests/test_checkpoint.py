"""Checkpoint files (``ldm.checkpoint``): both formats read, bad files give a clear error
naming the file, a pickle that would run code is refused without running, and a strict
mismatch explains its most likely cause."""

from __future__ import annotations

import logging
import os
import pickle
import random
from pathlib import Path

import pytest
import torch

from conftest import CONFIGS, family_keys, tiny_model
from ldm.checkpoint import CheckpointError, apply_state_dict, load_state_dict, save_state_dict
from ldm.loading import load_model_from_config

UNET = "model.diffusion_model."


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    return {"w": torch.randn(4, 3), "b": torch.arange(5.0), "step": torch.tensor(7)}


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)


# -- reading ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["m.safetensors", "m.ckpt", "m.pt"])
def test_round_trip(tmp_path, state, name):
    save_state_dict(state, tmp_path / name)
    assert_same(load_state_dict(tmp_path / name), state)


def test_ckpt_with_state_dict_entry_and_training_extras(tmp_path, state):
    # The layout of the released .ckpt files: the tensors under "state_dict", plus counters.
    torch.save({"state_dict": state, "global_step": 875000, "epoch": 3}, tmp_path / "m.ckpt")
    assert_same(load_state_dict(tmp_path / "m.ckpt"), state)


def test_flat_ckpt(tmp_path, state):
    torch.save(state, tmp_path / "flat.ckpt")
    assert_same(load_state_dict(tmp_path / "flat.ckpt"), state)


def test_save_refuses_to_overwrite_and_leaves_no_temp_file(tmp_path, state):
    path = tmp_path / "m.safetensors"
    save_state_dict(state, path)
    before = path.read_bytes()
    with pytest.raises(FileExistsError):
        save_state_dict({"other": torch.zeros(1)}, path)
    assert path.read_bytes() == before
    save_state_dict({"other": torch.zeros(1)}, path, overwrite=True)
    assert list(load_state_dict(path)) == ["other"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


def _truncate(path: Path) -> Path:
    data = path.read_bytes()
    out = path.with_name("truncated" + path.suffix)
    out.write_bytes(data[: len(data) // 2])
    return out


def _bad_files(folder: Path, state) -> dict[str, Path]:
    save_state_dict(state, folder / "good.safetensors")
    save_state_dict(state, folder / "good.ckpt")
    text = "this is a README, not a checkpoint\n" * 20
    files = {
        "missing": folder / "missing.ckpt",
        "folder": folder,
        "text.ckpt": folder / "text.ckpt",
        "text.safetensors": folder / "text.safetensors",
        "empty.ckpt": folder / "empty.ckpt",
        "empty.safetensors": folder / "empty.safetensors",
        "truncated.safetensors": _truncate(folder / "good.safetensors"),
        "truncated.ckpt": _truncate(folder / "good.ckpt"),
        "tensor.ckpt": folder / "tensor.ckpt",
        "mixed.ckpt": folder / "mixed.ckpt",
    }
    files["text.ckpt"].write_text(text)
    files["text.safetensors"].write_text(text)
    files["empty.ckpt"].write_bytes(b"")
    files["empty.safetensors"].write_bytes(b"")
    torch.save(torch.ones(3), files["tensor.ckpt"])
    torch.save({"w": torch.ones(3), "note": "hello"}, files["mixed.ckpt"])
    return files


BAD = ["missing", "folder", "text.ckpt", "text.safetensors", "empty.ckpt", "empty.safetensors",
       "truncated.safetensors", "truncated.ckpt", "tensor.ckpt", "mixed.ckpt"]


@pytest.mark.parametrize("kind", BAD)
def test_bad_file_gives_a_clear_error_naming_it(tmp_path, state, kind):
    path = _bad_files(tmp_path, state)[kind]
    with pytest.raises(CheckpointError) as err:
        load_state_dict(path)
    message = str(err.value)
    assert str(path) in message
    assert "Traceback" not in message and len(message.splitlines()) <= 3
    # The low-level error does not leak as the cause of the traceback users see.
    assert err.value.__cause__ is None


NOT_TORCH, CORRUPT = "is not a PyTorch checkpoint", "is not a readable PyTorch checkpoint"


@pytest.mark.parametrize(
    "head, expected",
    [(b"", NOT_TORCH), (b"PK", NOT_TORCH), (b"\x00\x01", NOT_TORCH), (b"\x80\x01", NOT_TORCH),
     (b'{"__metadata__": {}}', NOT_TORCH), (b"\x80\x02", CORRUPT), (b"\x80\x05", CORRUPT), (b"PK\x03\x04", CORRUPT)],
)
@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch's note on the \x80\x05 header
def test_random_bytes_are_no_checkpoint_and_never_refused(tmp_path, head, expected):
    """Neither zip nor pickle: not a PyTorch checkpoint. Noise behind a zip or pickle header:
    corrupt. "refused" is kept for pickles that name code."""
    path = tmp_path / "random.ckpt"
    path.write_bytes(head + random.Random(0).randbytes(4096))
    with pytest.raises(CheckpointError, match=expected) as err:
        load_state_dict(path)
    assert "refused" not in str(err.value)


class _RunsCode:
    """Unpickling this would run a shell command creating ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


@pytest.mark.parametrize("layout", ["zip", "legacy"])
def test_malicious_pickle_is_refused_and_does_not_run(tmp_path, layout):
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.ckpt"
    if layout == "zip":
        torch.save({"state_dict": {"w": torch.zeros(1), "evil": _RunsCode(marker)}}, path)
    else:  # a bare pickle, as torch.save wrote before 1.6
        path.write_bytes(pickle.dumps({"state_dict": {"evil": _RunsCode(marker)}}, protocol=2))
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="refused") as err:
        load_state_dict(path)
    assert str(path) in str(err.value) and "system" in str(err.value)
    assert not marker.exists()


# -- strict application ----------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_state(tiny_eps_model) -> dict[str, torch.Tensor]:
    return tiny_eps_model.state_dict()


@pytest.fixture()
def fresh_model():
    return tiny_model("eps", seed=1)


def test_apply_state_dict_copies_the_weights(fresh_model, tiny_state):
    apply_state_dict(fresh_model, tiny_state)
    assert_same(fresh_model.state_dict(), tiny_state)


def test_missing_and_unexpected_keys_are_listed_with_counts(fresh_model, tiny_state):
    state = dict(tiny_state)
    dropped = [k for k in state if k.startswith(UNET + "output_blocks.")]
    for k in dropped:
        del state[k]
    state["some.stray.tensor"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as err:
        apply_state_dict(fresh_model, state)
    message = str(err.value)
    assert f"missing keys {len(dropped)}:" in message and "more)" in message
    assert sorted(dropped)[0] in message
    assert "unexpected keys 1: some.stray.tensor" in message


def test_non_strict_tolerates_missing_keys_but_not_shapes(fresh_model, tiny_state):
    state = {k: v for k, v in tiny_state.items() if not k.startswith("cond_stage_model.")}
    kept = {k: v.clone() for k, v in fresh_model.state_dict().items() if k.startswith("cond_stage_model.")}
    apply_state_dict(fresh_model, state, strict=False)
    now = fresh_model.state_dict()
    assert all(torch.equal(now[k], v) for k, v in state.items())
    assert all(torch.equal(now[k], v) for k, v in kept.items())  # the missing ones keep their values
    state[UNET + "out.2.bias"] = torch.zeros(5)
    with pytest.raises(CheckpointError, match="shape mismatches"):
        apply_state_dict(fresh_model, state, strict=False)


@pytest.mark.parametrize("dtype", [torch.int32, torch.uint8, torch.bool, torch.complex64])
def test_non_float_weights_give_one_message_naming_them(tiny_files, tmp_path, dtype):
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in load_state_dict(tiny_files["ckpt"]).items()}
    save_state_dict(state, tmp_path / "converted.ckpt")
    with pytest.raises(CheckpointError) as err:  # the meta-device load (assign=True)
        load_model_from_config(tiny_files["config"], tmp_path / "converted.ckpt")
    message = str(err.value)
    assert len(message.splitlines()) <= 4 and "While copying" not in message
    assert f"dtype mismatches {sum(v.dtype == dtype for v in state.values())}:" in message
    assert f"(checkpoint {dtype}, model expects floating point)" in message and "quantized" in message


def test_one_integer_tensor_is_named_even_when_a_cast_would_hide_it(fresh_model, tiny_state):
    state = dict(tiny_state)
    state[UNET + "out.2.weight"] = state[UNET + "out.2.weight"].round().long()
    with pytest.raises(CheckpointError) as err:  # load_state_dict's copy would cast it silently
        apply_state_dict(fresh_model, state)
    assert f"dtype mismatches 1: {UNET}out.2.weight (checkpoint torch.int64, model expects floating point)" in str(err.value)


def test_float16_weights_load_as_their_values_in_the_models_float32(fresh_model, tiny_state):
    state = {k: v.half() for k, v in tiny_state.items()}
    apply_state_dict(fresh_model, state)  # a cast within a kind is how half-precision files load
    loaded = fresh_model.state_dict()
    assert all(loaded[k].dtype == torch.float32 and torch.equal(loaded[k], v.float()) for k, v in state.items())


def test_native_mha_checkpoint_against_original_config_points_to_converter(fresh_model):
    native_state = tiny_model("eps", native_mha=True).state_dict()
    with pytest.raises(CheckpointError) as err:
        apply_state_dict(fresh_model, native_state)
    message = str(err.value)
    assert "native-MHA" in message and "tools/convert_native_mha.py" in message
    assert "in_proj_weight" in message


def test_original_checkpoint_against_native_config_points_to_converter(tiny_state):
    with pytest.raises(CheckpointError) as err:
        apply_state_dict(tiny_model("eps", native_mha=True), tiny_state)
    assert "tools/convert_native_mha.py" in str(err.value) and "use_native_mha" in str(err.value)


def _sd1_like(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tiny state rewritten the way an SD 1.x checkpoint differs: a CLIP ViT-L
    (transformers) text encoder and 768-wide cross-attention keys and values."""
    out = {}
    for k, v in state.items():
        if k.startswith("cond_stage_model.model."):
            continue
        if k.endswith(("attn2.to_k.weight", "attn2.to_v.weight")):
            v = torch.zeros(v.shape[0], 768)
        out[k] = v
    out["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"] = torch.zeros(49408, 8)
    out["cond_stage_model.transformer.text_model.final_layer_norm.weight"] = torch.zeros(8)
    return out


def test_sd1_checkpoint_is_recognised(fresh_model, tiny_state):
    with pytest.raises(CheckpointError) as err:
        apply_state_dict(fresh_model, _sd1_like(tiny_state))
    message = str(err.value)
    assert "Stable Diffusion 1" in message and "768" in message
    assert "cond_stage_model.transformer.text_model" in message


def test_sd1_cross_attention_width_alone_is_recognised(fresh_model, tiny_state):
    state = {k: v for k, v in _sd1_like(tiny_state).items() if not k.startswith("cond_stage_model.")}
    state.update({k: v for k, v in tiny_state.items() if k.startswith("cond_stage_model.")})
    with pytest.raises(CheckpointError, match="Stable Diffusion 1"):
        apply_state_dict(fresh_model, state)


@pytest.mark.parametrize("channels, kind", [(9, "inpainting"), (5, "depth")])
def test_extra_input_channels_are_recognised(fresh_model, tiny_state, channels, kind):
    state = dict(tiny_state)
    w = state[UNET + "input_blocks.0.0.weight"]
    state[UNET + "input_blocks.0.0.weight"] = torch.zeros(w.shape[0], channels, *w.shape[2:])
    with pytest.raises(CheckpointError) as err:
        apply_state_dict(fresh_model, state)
    message = str(err.value)
    assert kind in message and f"checkpoint ({w.shape[0]}, {channels}, 3, 3)" in message


def test_depth_checkpoint_is_recognised(fresh_model, tiny_state):
    state = {**tiny_state, "depth_model.model.pretrained.layer1.0.weight": torch.zeros(1)}
    with pytest.raises(CheckpointError, match="depth"):
        apply_state_dict(fresh_model, state)


def test_model_ema_entries_are_ignored_with_a_log_line(fresh_model, tiny_state, caplog):
    state = dict(tiny_state)
    state["model_ema.decay"] = torch.tensor(0.9999)
    state["model_ema.num_updates"] = torch.tensor(10, dtype=torch.int)
    state["model_ema.diffusion_modelout2bias"] = torch.zeros(4)
    with caplog.at_level(logging.INFO, logger="ldm.checkpoint"):
        apply_state_dict(fresh_model, state)
    assert any("3 model_ema.* tensors" in r.getMessage() for r in caplog.records)
    assert_same(fresh_model.state_dict(), tiny_state)


# -- inpainting and depth families: a checkpoint given to another family's config
FAMILY_MODELS = {"text-to-image": "tiny_eps_model", "inpainting": "tiny_inpaint_model", "depth": "tiny_depth_model"}
RIGHT_CONFIG = {
    "text-to-image": "v2-inference.yaml",
    "inpainting": "v2-inpainting-inference.yaml",
    "depth": "v2-midas-inference.yaml",
}


@pytest.mark.parametrize(
    "checkpoint, config",
    [(c, m) for c in FAMILY_MODELS for m in FAMILY_MODELS if c != m],
)
def test_a_checkpoint_of_another_family_names_it_and_its_config(request, checkpoint, config):
    state = request.getfixturevalue(FAMILY_MODELS[checkpoint]).state_dict()
    model = request.getfixturevalue(FAMILY_MODELS[config])
    with pytest.raises(CheckpointError) as err:
        apply_state_dict(model, state)
    message = str(err.value)
    note = message.splitlines()[-1]
    assert note.startswith("The UNet's input channels differ")
    assert checkpoint in note and config in note
    assert f"Use configs/stable-diffusion/{RIGHT_CONFIG[checkpoint]}" in note
    assert "input_blocks.0.0.weight" in message


def test_depth_checkpoint_without_its_midas_model_says_where_it_was(tiny_depth_model):
    state = {k: v for k, v in tiny_depth_model.state_dict().items() if not k.startswith("depth_model.")}
    with pytest.raises(CheckpointError) as err:
        apply_state_dict(tiny_depth_model, state)
    message = str(err.value)
    lacking = sum(k.startswith("depth_model.") for k in tiny_depth_model.state_dict())
    assert f"lacks the MiDaS depth model ({lacking} depth_model.* tensors)" in message
    assert "dpt_hybrid-midas-501f0c75.pt" in message and "prefix depth_model.model." in message


def test_depth_model_named_otherwise_is_recognised(tiny_depth_model):
    """A MiDaS backbone saved under other timm names (here an older ``layers.`` for ``stages.``)."""
    state = {k.replace(".backbone.stages.", ".backbone.layers."): v for k, v in tiny_depth_model.state_dict().items()}
    with pytest.raises(CheckpointError, match="depth model's tensors are named otherwise .* timm 1.0"):
        apply_state_dict(tiny_depth_model, state)


def test_load_names_the_file_and_the_right_config(tiny_inpaint_model, tiny_files, tmp_path):
    from ldm.loading import load_model_from_config

    save_state_dict(tiny_inpaint_model.state_dict(), tmp_path / "inpainting.safetensors")
    with pytest.raises(CheckpointError) as err:
        load_model_from_config(tiny_files["config"], tmp_path / "inpainting.safetensors")
    message = str(err.value)
    assert "inpainting.safetensors" in message and "v2-inpainting-inference.yaml" in message


# -- the x4 upscaler's and unCLIP's checkpoints given to another family's config -------------
REAL = {
    "sd2": "v2-inference-v.yaml",
    "x4-upscaler": "x4-upscaling.yaml",
    "unclip-l": "v2-1-stable-unclip-l-inference.yaml",
    "unclip-h": "v2-1-stable-unclip-h-inference.yaml",
}


@pytest.fixture(scope="module")
def real_meta_models() -> dict:
    from ldm.loading import build_model

    return {name: build_model(CONFIGS / config, "meta") for name, config in REAL.items()}


@pytest.mark.parametrize("checkpoint, config", [(k, c) for k in REAL for c in REAL if k != c])
def test_family_checkpoint_given_to_another_config_names_the_right_one(checkpoint, config, real_meta_models):
    state = {k: torch.empty(shape, device="meta") for k, shape in family_keys(checkpoint).items()}
    with pytest.raises(CheckpointError) as err:
        apply_state_dict(real_meta_models[config], state, assign=True)
    message = str(err.value)
    if checkpoint == "sd2":
        family = "the SD2 x4 upscaler" if config == "x4-upscaler" else "Stable unCLIP"
        assert f"The config is for {family}" in message and "v2-inference.yaml" in message
    else:
        assert f"use configs/stable-diffusion/{REAL[checkpoint]}" in message
    assert "inpainting" not in message, "the x4 upscaler's 7 input channels are not an inpainting model's"
