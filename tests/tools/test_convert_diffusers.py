"""tools/convert_diffusers.py: a diffusers folder (written by diffusers) to an original-layout
file and back, for the tiny eps and v models; the files load and compute as the model they came
from, bit for bit; existing outputs are refused without --overwrite and nothing is left behind."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

from conftest import ROOT, assert_computes_as, child_env, load_script, tiny_config
from ldm.checkpoint import load_state_dict, save_state_dict
from ldm.diffusers_format import inspect_folder
from ldm.loading import load_model_from_config

TOOL = ROOT / "tools" / "convert_diffusers.py"
tool = load_script("tools/convert_diffusers.py")
UNUSED = ("cond_stage_model.model.transformer.resblocks.2.", "cond_stage_model.model.text_projection")


@pytest.fixture(params=["eps", "v"])
def case(request, tiny_diffusers_folders, tiny_eps_model, tiny_v_model, tmp_path):
    """(its tiny model, the model's diffusers folder, its config file)."""
    p = request.param
    config = tmp_path / f"tiny-{p}.yaml"
    OmegaConf.save(tiny_config(p), config)
    return tiny_eps_model if p == "eps" else tiny_v_model, tiny_diffusers_folders[p], config


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_folder_to_file_computes_as_the_model(case, tmp_path, capsys, suffix):
    model, folder, config = case
    out = tmp_path / f"model{suffix}"
    assert tool.main([str(folder), str(out), "--config", str(config)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    assert_computes_as(load_model_from_config(config, out), model)


def test_file_to_folder_and_back(case, tmp_path, capsys):
    model, _, config = case
    original = tmp_path / "original.safetensors"
    save_state_dict(model.state_dict(), original)
    assert tool.main([str(original), str(tmp_path / "folder"), "--config", str(config)]) == 0
    assert "wrote the diffusers folder" in capsys.readouterr().out
    assert inspect_folder(tmp_path / "folder").parameterization == model.parameterization
    assert tool.main([str(tmp_path / "folder"), str(tmp_path / "back.safetensors"), "--config", str(config)]) == 0
    back, state = load_state_dict(tmp_path / "back.safetensors"), model.state_dict()
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], v) for k, v in state.items() if not k.startswith(UNUSED))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["back.safetensors", "folder", "original.safetensors", config.name])


def test_existing_outputs_are_kept_without_overwrite(case, tmp_path, capsys):
    _, folder, config = case
    out, dest = tmp_path / "model.safetensors", tmp_path / "folder"
    out.write_bytes(b"keep")
    dest.mkdir()
    (dest / "mine.txt").write_text("keep")
    assert tool.main([str(folder), str(out), "--config", str(config)]) == 1
    assert tool.main([str(out), str(dest), "--config", str(config)]) == 1
    assert capsys.readouterr().err.count("exists; refusing to overwrite it (pass --overwrite)") == 2
    assert out.read_bytes() == b"keep" and [p.name for p in dest.iterdir()] == ["mine.txt"]
    assert tool.main([str(folder), str(out), "--config", str(config), "--overwrite"]) == 0
    assert tool.main([str(out), str(dest), "--config", str(config), "--overwrite"]) == 0
    assert not (dest / "mine.txt").exists() and inspect_folder(dest)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([config.name, "folder", "model.safetensors"])


def test_bad_inputs_are_one_line_errors(tiny_diffusers_folders, tiny_files, tmp_path, capsys):
    assert tool.main([str(tiny_files["safetensors"]), str(tmp_path / "folder")]) == 1
    assert "is a file: pass --config" in capsys.readouterr().err
    assert tool.main([str(tiny_diffusers_folders["eps"] / "unet"), str(tmp_path / "x.safetensors")]) == 1
    assert "one component of a diffusers pipeline" in capsys.readouterr().err
    # Without --config, the folder's own: the full-size SD2 config, which the tiny folder does not fit.
    assert tool.main([str(tiny_diffusers_folders["eps"]), str(tmp_path / "x.safetensors")]) == 1
    error = capsys.readouterr().err
    assert "is not the model of configs/stable-diffusion/v2-inference.yaml: unet/config.json: " in error
    assert "block_out_channels is [32, 64], the config's [320, 640, 1280, 1280]" in error
    assert not list(tmp_path.iterdir())


def test_an_incomplete_folder_writes_nothing(tiny_diffusers_folders, tmp_path, capsys):
    import shutil

    from safetensors.torch import load_file, save_file

    folder = shutil.copytree(tiny_diffusers_folders["eps"], tmp_path / "folder")
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    save_file({k: v for k, v in load_file(weights).items() if not k.startswith("conv_out.")}, weights)
    config = tmp_path / "tiny.yaml"
    OmegaConf.save(tiny_config(), config)
    assert tool.main([str(folder), str(tmp_path / "x.safetensors"), "--config", str(config)]) == 1
    assert "missing keys 2: model.diffusion_model.out.2.bias, model.diffusion_model.out.2.weight" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()


def test_help_and_exit_status():
    done = subprocess.run([sys.executable, str(TOOL), "--help"], capture_output=True, text=True, cwd=ROOT, env=child_env(), timeout=120)
    assert done.returncode == 0 and "diffusers folder" in done.stdout and "--overwrite" in done.stdout
    done = subprocess.run([sys.executable, str(TOOL), "missing-folder", "x.safetensors"], capture_output=True, text=True, cwd=ROOT,
                          env=child_env(), timeout=120)
    assert done.returncode == 1 and done.stderr == "error: missing-folder: no such file or folder\n"
