"""tools/convert_native_mha.py: both directions, both formats, exact round trips, and the
refusals (existing output, input already converted, truncated input) that leave nothing behind.
ControlNet files convert the same way.
The x4 upscaler's and unCLIP's checkpoints convert for their *_native_mha.yaml twins, whose
outputs then equal the original layout's to float32 rounding (1e-5 relative, as
tests/test_native_mha.py explains; observed 0: both run the same SDPA kernel here)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import ROOT, child_env, load_script, randomize_, rel_err, tiny_config, tiny_unclip_config, tiny_x4_config
from ldm.checkpoint import load_state_dict, save_state_dict
from ldm.loading import load_model_from_config
from ldm.modules.diffusionmodules.controlnet import ControlNet, controlnet_params, load_controlnet
from ldm.native_mha import NATIVE, detect_layout

TOOL = ROOT / "tools" / "convert_native_mha.py"


tool = load_script("tools/convert_native_mha.py")


def files_in(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize(("src_fmt", "mid_fmt"), [("safetensors", "ckpt"), ("ckpt", "safetensors")])
def test_round_trip_is_exact(tiny_files, tmp_path, capsys, src_fmt, mid_fmt):
    """Each format read and written in each direction; the round trip gives the input back."""
    src = tiny_files[src_fmt]
    mid, back = tmp_path / f"native.{mid_fmt}", tmp_path / f"back.{src_fmt}"
    assert tool.main([str(src), str(mid)]) == 0
    out = capsys.readouterr().out
    assert "7 self-attention modules" in out and "7 cross-attention modules" in out
    assert "other tensors passed through unchanged" in out
    native = load_state_dict(mid)
    assert detect_layout(native) == NATIVE
    assert tool.main(["--reverse", str(mid), str(back)]) == 0
    assert "native-MHA layout -> original layout" in capsys.readouterr().out
    assert_same_tensors(load_state_dict(back), load_state_dict(src))
    assert files_in(tmp_path) == {mid.name, back.name}  # no temporary files left


def test_dtypes_and_other_entries_pass_through(tmp_path, tiny_files, capsys):
    state = load_state_dict(tiny_files["safetensors"])
    # float16 for every other tensor outside attention, and for the cross-attention modules.
    mixed = {
        k: v.half() if (i % 2 and ".attn" not in k) or ".0.attn2." in k else v for i, (k, v) in enumerate(state.items())
    }
    src = tmp_path / "mixed.ckpt"
    torch.save({"state_dict": mixed, "global_step": 875000}, src)
    assert tool.main([str(src), str(tmp_path / "native.safetensors")]) == 0
    assert "not tensors, not written: global_step" in capsys.readouterr().out
    native = load_state_dict(tmp_path / "native.safetensors")
    for k, v in mixed.items():
        if ".attn1." not in k and ".attn2." not in k:
            assert native[k].dtype == v.dtype and torch.equal(native[k], v), k
    attn2 = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2."
    assert native[attn2 + "q_proj_weight"].dtype == native[attn2 + "in_proj_bias"].dtype == torch.float16
    assert native[attn2.replace("attn2", "attn1") + "in_proj_bias"].dtype == torch.float32


def test_verify_reports_the_difference(tiny_files, tmp_path, capsys):
    assert tool.main([str(tiny_files["safetensors"]), str(tmp_path / "n.safetensors"), "--verify"]) == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if "verify:" in l)
    assert "over 14 attention modules" in line
    assert float(line.split("outputs ")[1].split()[0]) < 1e-5


def test_refuses_to_overwrite_without_force(tiny_files, tmp_path, capsys):
    out = tmp_path / "native.safetensors"
    out.write_bytes(b"precious")
    assert tool.main([str(tiny_files["safetensors"]), str(out)]) == 1
    assert "refusing to overwrite" in capsys.readouterr().err
    assert out.read_bytes() == b"precious"
    assert tool.main([str(tiny_files["safetensors"]), str(out), "--force"]) == 0
    assert detect_layout(load_state_dict(out)) == NATIVE


@pytest.mark.parametrize("reverse", [False, True])
def test_input_already_in_target_layout(tiny_files, tmp_path, capsys, reverse):
    src = tiny_files["ckpt"]
    if not reverse:
        src = tmp_path / "native.ckpt"
        assert tool.main([str(tiny_files["ckpt"]), str(src)]) == 0
    before = files_in(tmp_path)
    args = ["--reverse"] * reverse + [str(src), str(tmp_path / "out.ckpt")]
    assert tool.main(args) == 1
    err = capsys.readouterr().err
    layout = "original" if reverse else "native-MHA"
    assert f"already in the {layout} layout" in err and "nothing written" in err
    assert files_in(tmp_path) == before


@pytest.mark.parametrize("fmt", ["safetensors", "ckpt"])
def test_truncated_input_leaves_nothing_behind(tiny_files, tmp_path, capsys, fmt):
    data = tiny_files[fmt].read_bytes()
    src = tmp_path / f"truncated.{fmt}"
    src.write_bytes(data[: len(data) * 2 // 3])
    assert tool.main([str(src), str(tmp_path / f"out.{fmt}")]) == 1
    assert "truncated or corrupt" in capsys.readouterr().err
    assert files_in(tmp_path) == {src.name}


def test_missing_input(tmp_path, capsys):
    assert tool.main([str(tmp_path / "nope.ckpt"), str(tmp_path / "out.ckpt")]) == 1
    assert "checkpoint not found" in capsys.readouterr().err
    assert files_in(tmp_path) == set()


def test_command_line_entry_point(tiny_files, tmp_path):
    """The script runs as a program and exits non-zero on refusal."""
    out = tmp_path / "n.safetensors"
    run = [sys.executable, str(TOOL)]
    done = subprocess.run(run + [str(tiny_files["safetensors"]), str(out)], capture_output=True, text=True, env=child_env(), timeout=120)
    assert done.returncode == 0, done.stderr
    again = subprocess.run(run + [str(tiny_files["safetensors"]), str(out)], capture_output=True, text=True, env=child_env(), timeout=120)
    assert again.returncode == 1 and "refusing to overwrite" in again.stderr
    assert detect_layout(load_state_dict(out)) == NATIVE


@pytest.mark.parametrize("family", ["x4", "unclip-l"])
def test_family_checkpoints_convert_for_their_native_twins(family, tmp_path, capsys, tiny_x4_model, tiny_unclip_models,
                                                           tiny_clip_stats):
    gen = torch.Generator().manual_seed(0)
    context = torch.randn(2, 77, 48, generator=gen)
    if family == "x4":
        model, twin = tiny_x4_model, tiny_x4_config(native_mha=True)
        low_res = torch.randn(2, 3, 8, 8, generator=gen)
        cond = {"c_concat": [low_res], "c_crossattn": [context], "c_adm": torch.tensor([1, 300])}
    else:
        model, twin = tiny_unclip_models["l"], tiny_unclip_config("l", tiny_clip_stats, native_mha=True)
        cond = {"c_crossattn": [context], "c_adm": torch.randn(2, 64, generator=gen)}
    save_state_dict(model.state_dict(), tmp_path / "original.safetensors")
    assert tool.main([str(tmp_path / "original.safetensors"), str(tmp_path / "native.safetensors"), "--verify"]) == 0
    assert "verify" in capsys.readouterr().out
    native = load_model_from_config(twin, tmp_path / "native.safetensors")
    x, t = torch.randn(2, 4, 8, 8, generator=gen), torch.tensor([3, 700])
    with torch.no_grad():
        assert rel_err(native.apply_model(x, t, cond), model.apply_model(x, t, cond)) <= 1e-5


def test_a_controlnet_file_converts_and_loads_into_a_native_controlnet(tmp_path, capsys):
    """A ControlNet (control_model.* keys) converts as the UNet does: the native file fills a
    native-MHA ControlNet strictly, with the same residuals, and --reverse gives the file back."""
    params = OmegaConf.to_container(tiny_config().model.params.unet_config.params)
    net = randomize_(ControlNet(**controlnet_params(params)), 7).eval()
    state = {f"control_model.{k}": v for k, v in net.state_dict().items()}
    save_state_dict(state, tmp_path / "control.safetensors")
    assert tool.main([str(tmp_path / "control.safetensors"), str(tmp_path / "native.safetensors")]) == 0
    assert tool.main(["--reverse", str(tmp_path / "native.safetensors"), str(tmp_path / "back.safetensors")]) == 0
    assert detect_layout(load_state_dict(tmp_path / "native.safetensors")) == NATIVE
    assert_same_tensors(load_state_dict(tmp_path / "back.safetensors"), state)
    native = load_controlnet(tmp_path / "native.safetensors", {**params, "use_native_mha": True})
    g = torch.Generator().manual_seed(0)
    x, hint, c = torch.randn(1, 4, 8, 8, generator=g), torch.rand(1, 3, 64, 64, generator=g), torch.randn(1, 77, 48, generator=g)
    with torch.no_grad():
        for got, expected in zip(native(x, hint, torch.tensor([500]), c), net(x, hint, torch.tensor([500]), c)):
            assert rel_err(got, expected) <= 1e-5
