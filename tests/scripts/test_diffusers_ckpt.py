"""``--ckpt`` naming a diffusers folder: the scripts (txt2img; inpaint for an inpainting folder)
and the benchmark convert it as they load, giving the same images as the original-layout file of
the same weights, bit for bit; without --config the folder names its own; bad folders and
folders of another config's model are one-line errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from conftest import ROOT, diffusers_pipeline_twin, load_script, sample_images, tiny_family_config
from ldm.checkpoint import load_state_dict, save_state_dict
from ldm.generation import main
from ldm.generation.model import resolve_model_files
from ldm.generation.settings import ModelSettings

FAST = ["--steps", "2", "--n_samples", "1", "--n_iter", "1", "--precision", "full", "--no_watermark"]
SIZE = ["--H", "64", "--W", "64"]


def test_txt2img_with_a_folder_equals_the_file(tiny_files, tiny_diffusers_folders, tmp_path):
    for name, ckpt in (("file", tiny_files["safetensors"]), ("folder", tiny_diffusers_folders["eps"])):
        assert main(["--config", str(tiny_files["config"]), "--ckpt", str(ckpt), "--outdir", str(tmp_path / name), *SIZE, *FAST], "txt2img") == 0
    got, expected = sample_images(tmp_path / "folder"), sample_images(tmp_path / "file")
    assert len(got) == 1 and np.array_equal(got[0], expected[0])


def test_inpaint_with_a_folder_equals_the_file(tiny_inpaint_model, tmp_path):
    config = tmp_path / "tiny-inpainting.yaml"
    OmegaConf.save(tiny_family_config("inpainting"), config)
    save_state_dict(tiny_inpaint_model.state_dict(), tmp_path / "inpaint.safetensors")
    diffusers_pipeline_twin(tiny_family_config("inpainting"), tiny_inpaint_model).save_pretrained(tmp_path / "inpaint-folder")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "image.png")
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 8:40] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    inputs = ["--image", str(tmp_path / "image.png"), "--mask", str(tmp_path / "mask.png")]
    for name in ("inpaint.safetensors", "inpaint-folder"):
        flags = ["--config", str(config), "--ckpt", str(tmp_path / name), "--outdir", str(tmp_path / f"out-{name}"), *inputs, *FAST]
        assert main(flags, "inpaint") == 0
    got, expected = sample_images(tmp_path / "out-inpaint-folder"), sample_images(tmp_path / "out-inpaint.safetensors")
    assert len(got) == 1 and np.array_equal(got[0], expected[0])


@pytest.mark.parametrize("parameterization", ["eps", "v"])
def test_a_folder_names_its_config(parameterization, tiny_diffusers_folders, tiny_files):
    folder = tiny_diffusers_folders[parameterization]
    files = resolve_model_files(ModelSettings(ckpt=folder))
    name = "v2-inference.yaml" if parameterization == "eps" else "v2-inference-v.yaml"
    assert files.config.resolve() == ROOT / "configs" / "stable-diffusion" / name and files.ckpt == folder
    assert resolve_model_files(ModelSettings(config=tiny_files["config"], ckpt=folder)).config == tiny_files["config"]


def test_bad_folders_are_one_line_errors(tiny_files, tiny_diffusers_folders, tmp_path, capsys):
    run = ["--outdir", str(tmp_path / "out"), *SIZE, *FAST]
    assert main(["--ckpt", str(tmp_path), *run], "txt2img") == 1
    assert "--ckpt: " in capsys.readouterr().err
    # The v model's folder with the eps config: its tensors would load, its predictions be misread.
    assert main(["--config", str(tiny_files["config"]), "--ckpt", str(tiny_diffusers_folders["v"]), *run], "txt2img") == 1
    error = capsys.readouterr().err
    assert "scheduler/scheduler_config.json: prediction_type is 'v_prediction', the config's 'epsilon'" in error
    assert "\n" not in error.strip() and not (tmp_path / "out").exists()


def test_benchmark_converts_a_folder_once(tiny_files, tiny_diffusers_folders, tmp_path, capsys):
    benchmark = load_script("scripts/benchmark.py")
    folder = tiny_diffusers_folders["eps"]
    args = benchmark.parse_args(["--config", str(tiny_files["config"]), "--ckpt", str(folder), "--H", "64", "--W", "64"])
    path = benchmark.converted_checkpoint(args.config, args.ckpt, tmp_path)
    assert path.name in benchmark.RESULTS
    expected, converted = load_state_dict(tiny_files["safetensors"]), load_state_dict(path)
    assert converted.keys() == expected.keys()
    unused = ("cond_stage_model.model.transformer.resblocks.2.", "cond_stage_model.model.text_projection")
    assert all(torch.equal(converted[k], v) for k, v in expected.items() if not k.startswith(unused))
    with pytest.raises(SystemExit):  # the folder's own config, the full-size one, does not fit the tiny folder
        benchmark.parse_args(["--ckpt", str(folder)])
    assert "--ckpt: " in capsys.readouterr().err


def test_webui_serves_a_folder(tiny_files, tiny_diffusers_folders, tmp_path):
    pytest.importorskip("gradio", reason="the web UI needs gradio: pip install -e '.[webui]'")
    webui = load_script("scripts/webui.py")
    args = webui.build_parser().parse_args(["--config", str(tiny_files["config"]), "--ckpt", str(tiny_diffusers_folders["eps"]),
                                            "--device", "cpu", "--precision", "full", "--outdir", str(tmp_path)])
    app = webui.build_app(args)  # the model loaded from the folder, the page built
    assert f"`{tiny_files['config'].name}`, `{tiny_diffusers_folders['eps'].name}`" in repr(app.config)  # the page names the model
