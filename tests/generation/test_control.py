"""ControlNets on the command line (ldm.generation.control): the flags, the hint preprocessors, and a
run of scripts/txt2img.py and img2img.py with --control giving the pixels of the same controls put
into the sampler directly (whose numbers are checked against diffusers in
tests/modules/diffusionmodules/test_controlnet.py); bad inputs explained.

Both sides run the same operations in the same order on the same CPU: pixels agree to one uint8 level.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from conftest import CONFIGS, load_script, randomize_, sample_images, samples, tiny_config, tiny_family_config
from ldm.checkpoint import save_state_dict
from ldm.generation import main
from ldm.generation.control import ControlSettings, canny, controls_from_args, midas_depth, parse_control, scribble
from ldm.generation.errors import UsageError
from ldm.generation.run import seed_everything
from ldm.loading import load_model_from_config
from ldm.models.diffusion.ddim import DDIMSampler
from ldm.modules.diffusionmodules.controlnet import Control, ControlNet, controlnet_params
from ldm.modules.midas.api import midas_transform

SIZE = ["--H", "64", "--W", "64"]
FAST = ["--steps", "4", "--n_samples", "1", "--n_iter", "1", "--precision", "full", "--seed", "3",
        "--no_watermark"]


@pytest.fixture(scope="module")
def files(tiny_files, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("control")
    params = OmegaConf.to_container(tiny_config().model.params.unet_config.params)
    net = randomize_(ControlNet(**controlnet_params(params)), 7)
    save_state_dict({f"control_model.{k}": v for k, v in net.state_dict().items()}, root / "control.safetensors")
    image = np.zeros((48, 40, 3), np.uint8)
    image[10:30, 8:28] = 255
    Image.fromarray(image).save(root / "hint.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(root / "init.png")
    return {**tiny_files, "control": root / "control.safetensors", "hint": root / "hint.png", "init": root / "init.png"}


def run(files, task: str, outdir: Path, *flags: str) -> list[np.ndarray]:
    size = SIZE if task == "txt2img" else []
    argv = ["--config", str(files["config"]), "--ckpt", str(files["safetensors"]), "--outdir", str(outdir), *size, *FAST, *flags]
    assert main(argv, task) == 0
    return sample_images(outdir)


def expected_hint(files) -> torch.Tensor:
    image = Image.open(files["hint"]).convert("RGB").resize((64, 64), resample=Image.LANCZOS)
    return torch.from_numpy(np.asarray(image).astype(np.float32).transpose(2, 0, 1)[None].copy()) / 255.0


def test_parse_control_keeps_paths_with_colons():
    assert parse_control("cn.safetensors") == ("cn.safetensors", [])
    assert parse_control("cn.safetensors:0.5") == ("cn.safetensors", [0.5])
    assert parse_control("C:\\models\\cn.safetensors:0.5:0.1:0.9") == ("C:\\models\\cn.safetensors", [0.5, 0.1, 0.9])
    assert parse_control("a:b.safetensors:1") == ("a:b.safetensors", [1.0])


def args(**kw) -> argparse.Namespace:
    return argparse.Namespace(**{"control": [], "hint": [], "preprocess": [], "guess_mode": False, "midas": None,
                                 "midas_config": None, **kw})


def test_controls_from_args_pair_files_hints_and_preprocessing():
    got = controls_from_args(args(control=["a.pt:0.5", "b.pt:1:0.2:0.9"], hint=["h.png"], preprocess=["canny", "none"]))
    assert got == [ControlSettings(Path("a.pt"), Path("h.png"), 0.5, 0.0, 1.0, "canny"),
                   ControlSettings(Path("b.pt"), Path("h.png"), 1.0, 0.2, 0.9, "none")]
    for bad, message in [(args(hint=["h.png"]), "needs a --control"), (args(control=["a.pt"]), "needs a --hint"),
                         (args(control=["a.pt", "b.pt", "c.pt"], hint=["1.png", "2.png"]), "given 2 times for 3"),
                         (args(control=["a.pt:1:0.8:0.2"], hint=["h.png"]), "start 0.8 and end 0.2"),
                         (args(control=["a.pt"], hint=["h.png"], preprocess=["depth"]), "estimates depth with MiDaS: give --midas")]:
        with pytest.raises(UsageError, match=message):
            controls_from_args(bad)


def test_scribble_and_canny_hints():
    image = torch.ones(1, 3, 32, 32)
    image[:, :, 8:24, 8:24] = 0.0  # a black square on white
    stroke = scribble(image)
    assert stroke.shape == (1, 3, 32, 32) and torch.equal(stroke[0, 0], (image[0, 0] < 0.5).float())
    edges = canny(image)
    ys, xs = torch.nonzero(edges[0, 0], as_tuple=True)
    assert edges.shape == (1, 3, 32, 32) and len(ys) > 0 and set(edges.unique().tolist()) <= {0.0, 1.0}
    assert ys.min() >= 6 and ys.max() <= 25 and xs.min() >= 6 and xs.max() <= 25  # on the square's border only
    assert not edges[0, 0, 12:20, 12:20].any()


@pytest.fixture(scope="module")
def midas_files(tiny_depth_model, tmp_path_factory) -> dict[str, Path]:
    """The tiny depth model's checkpoint and config: what --midas and --midas_config read."""
    root = tmp_path_factory.mktemp("midas")
    save_state_dict(tiny_depth_model.state_dict(), root / "depth.safetensors")
    OmegaConf.save(tiny_family_config("depth"), root / "depth.yaml")
    return {"midas": root / "depth.safetensors", "midas_config": root / "depth.yaml"}


@pytest.mark.parametrize("size", [(64, 64), (48, 40)])
def test_depth_hint_is_midas_relative_depth(tiny_depth_model, transformers_dpt, size):
    """midas_depth: transformers' DPT (the same weights) on the depth model's MiDaS input, resized to
    the hint, stretched to [0, 1] and rounded to 8 bits; equal but for rounding flips (one level)."""
    hint = torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(5))
    got = midas_depth(hint, tiny_depth_model.depth_model)
    with torch.no_grad():
        x = midas_transform(hint, tiny_depth_model.depth_model.model.image_size)
        depth = transformers_dpt(pixel_values=x).predicted_depth.unsqueeze(1)
    depth = torch.nn.functional.interpolate(depth, size=size, mode="bicubic", align_corners=False)
    expected = torch.round(255 * (depth - depth.min()) / (depth.max() - depth.min())) / 255
    assert got.shape == (1, 3, *size) and torch.equal(got[:, 0], got[:, 2])
    assert (got[:, :1] - expected).abs().max() <= 1 / 255 + 1e-6
    assert (got[:, :1] != expected).float().mean() < 0.01
    assert got.min() == 0.0 and got.max() == 1.0


def test_preprocess_depth_reads_midas_from_the_depth_checkpoint(files, midas_files, tmp_path):
    """--preprocess depth --midas DEPTH_CKPT: the image is that of the same ControlNet reading the
    depth hint given ready-made (the preprocessed hint is 8-bit, so a PNG of it is the same hint)."""
    from ldm.generation.model import Model
    from ldm.generation.settings import ModelSettings

    midas = Model(ModelSettings(config=files["config"], ckpt=files["safetensors"], device="cpu")).depth_estimator(
        midas_files["midas"], midas_files["midas_config"])
    depth = midas_depth(expected_hint(files), midas)
    Image.fromarray((255 * depth[0].numpy().transpose(1, 2, 0)).round().astype(np.uint8)).save(tmp_path / "depth.png")
    flags = ["--prompt", "a box", "--control", str(files["control"])]
    got = run(files, "txt2img", tmp_path / "pre", *flags, "--hint", str(files["hint"]), "--preprocess", "depth",
              "--midas", str(midas_files["midas"]), "--midas_config", str(midas_files["midas_config"]))
    with Image.open(samples(tmp_path / "pre")[0]) as png:
        assert png.text["controlnet"].endswith("hint hint.png (depth)")
    ready = run(files, "txt2img", tmp_path / "ready", *flags, "--hint", str(tmp_path / "depth.png"))
    assert np.abs(got[0].astype(int) - ready[0].astype(int)).max() <= 1


def test_txt2img_with_a_controlnet_is_the_controlled_sampler(files, tmp_path):
    """--control FILE:0.8:0.2:0.8 --hint IMAGE: the PNG's pixels are those of DDIM with that Control
    (the hint stretched to 64x64) in the conditional and unconditional batches."""
    got = run(files, "txt2img", tmp_path, "--prompt", "a box", "--control", f"{files['control']}:0.8:0.2:0.8",
              "--hint", str(files["hint"]))
    with Image.open(samples(tmp_path)[0]) as png:
        assert png.text["controlnet"] == "control.safetensors:0.8:0.2:0.8 hint hint.png"
    from ldm.modules.diffusionmodules.controlnet import load_controlnet

    model = load_model_from_config(files["config"], files["safetensors"])
    net = load_controlnet(files["control"], tiny_config().model.params.unet_config.params)
    with torch.no_grad():
        seed_everything(3)
        c, uc = model.get_learned_conditioning(["a box"]), model.get_learned_conditioning([""])
        control = Control(net, expected_hint(files), torch.tensor([0.8]), t_low=0.2 * 999, t_high=0.8 * 999)
        z, _ = DDIMSampler(model).sample(4, 1, (4, 8, 8), {"c_crossattn": [c], "c_control": [control]}, verbose=False,
                                         unconditional_guidance_scale=9.0, eta=0.0,
                                         unconditional_conditioning={"c_crossattn": [uc], "c_control": [control]})
        x = torch.clamp((model.decode_first_stage(z) + 1) / 2, 0, 1)
    expected = (255.0 * x[0].numpy().transpose(1, 2, 0)).astype(np.uint8)
    assert np.abs(got[0].astype(int) - expected.astype(int)).max() <= 1
    plain = run(files, "txt2img", tmp_path / "plain", "--prompt", "a box")
    assert np.abs(plain[0].astype(int) - got[0].astype(int)).max() > 10  # the control changed the image


def test_weight_zero_and_img2img(files, tmp_path):
    """Weight 0 gives the image without ControlNet; img2img takes controls too (and changes)."""
    zero = run(files, "txt2img", tmp_path / "zero", "--control", f"{files['control']}:0", "--hint", str(files["hint"]))
    plain = run(files, "txt2img", tmp_path / "plain")
    assert np.abs(zero[0].astype(int) - plain[0].astype(int)).max() <= 1
    img2img = ["--init-img", str(files["init"]), "--strength", "0.75"]
    controlled = run(files, "img2img", tmp_path / "i2i", *img2img, "--control", str(files["control"]), "--hint", str(files["hint"]),
                     "--preprocess", "scribble", "--guess_mode")
    base = run(files, "img2img", tmp_path / "i2i-plain", *img2img)
    assert controlled[0].shape == base[0].shape == (64, 64, 3)
    assert np.abs(controlled[0].astype(int) - base[0].astype(int)).max() > 10


def test_controlnet_script_picks_the_task_by_init_img(files, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr("ldm.generation.main", lambda argv, task: calls.append(task) or 0)
    script = load_script("scripts/controlnet.py")
    assert "txt2img" in script.__doc__ and "img2img" in script.__doc__
    import runpy
    import sys

    for argv, task in [(["--prompt", "x"], "txt2img"), (["--init-img", "a.png"], "img2img")]:
        monkeypatch.setattr(sys, "argv", ["controlnet.py", *argv])
        with pytest.raises(SystemExit):
            runpy.run_path(str(Path(script.__file__)), run_name="__main__")
    assert calls == ["txt2img", "img2img"]


@pytest.mark.parametrize("case", ["sd15", "not an image", "missing file", "upscale", "no midas in --midas"])
def test_bad_controls_are_explained(files, tmp_path, capsys, case):
    flags = ["--control", str(files["control"]), "--hint", str(files["hint"])]
    task = "txt2img"
    if case == "sd15":
        state = {k: v for k, v in __import__("ldm.checkpoint", fromlist=["x"]).load_state_dict(files["control"]).items()}
        key = "control_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
        state[key] = torch.zeros(state[key].shape[0], 768)
        save_state_dict(state, tmp_path / "sd15.safetensors")
        flags[1], message = str(tmp_path / "sd15.safetensors"), "ControlNet for SD 1.x"
    elif case == "not an image":
        (tmp_path / "hint.png").write_text("text")
        flags[3], message = str(tmp_path / "hint.png"), "--hint .* cannot be read as an image"
    elif case == "missing file":
        flags[1], message = str(tmp_path / "none.safetensors"), "--control .*none.safetensors"
    elif case == "no midas in --midas":
        flags += ["--preprocess", "depth", "--midas", str(files["safetensors"])]
        message = "--midas: .*tiny.safetensors: it holds no MiDaS depth model"
    else:
        task, message = "upscale", "unrecognized arguments: --control"
        flags += ["--image", str(files["init"])]
    size = SIZE if task == "txt2img" else []
    argv = ["--config", str(files["config"]), "--ckpt", str(files["safetensors"]), "--outdir", str(tmp_path / "out"), *size, *FAST, *flags]
    assert main(argv, task) != 0
    import re

    assert re.search(message, capsys.readouterr().err)
    assert not list((tmp_path / "out").glob("samples/*.png"))


def test_the_memory_estimate_counts_each_controlnet(files, monkeypatch):
    """Each ControlNet adds its trunk's weights (the real SD2.1 ControlNet's bytes, built on meta,
    within 1%: its hint encoder is left out) and one set of residual maps;
    a run that fits alone is refused with two ControlNets."""
    from ldm.generation import memory
    from ldm.generation.model import Model
    from ldm.generation.settings import ModelSettings, SamplingSettings
    from ldm.generation.tasks import Txt2ImgPipeline

    real = Model(ModelSettings(config=CONFIGS / "v2-inference.yaml", random_weights=True, device="cpu"))
    with torch.device("meta"):
        net = ControlNet(**controlnet_params(real.config.model.params.unet_config.params))
    trunk = memory._controlnet_bytes(real.geometry.unet)
    assert 0.99 < trunk / memory.tensor_bytes(net) <= 1.0
    model = Model(ModelSettings(config=files["config"], ckpt=files["safetensors"], device="cpu", precision="full"))
    plain, one, two = (memory.estimate(model, 64, 64, 1, True, 1, controlnets=n) for n in (0, 1, 2))
    assert two.weights - one.weights == one.weights - plain.weights == memory._controlnet_bytes(model.geometry.unet)
    assert one.unet > plain.unet and two.unet == one.unet
    monkeypatch.setattr(memory, "available_memory", lambda device: (one.total + two.total) // 2)
    pipeline = Txt2ImgPipeline(model, SamplingSettings(steps=4), height=64, width=64)
    memory.check_fits(pipeline, guided=True)
    pipeline.use_controls([ControlSettings(files["control"], files["hint"])] * 2)
    with pytest.raises(Exception, match="needs about"):
        memory.check_fits(pipeline, guided=True)


@pytest.mark.slow
def test_compiled_controlled_run_compiles_each_network_once(files, tmp_path, caplog):
    """--compile --control --cache_interval 2 on the CPU: each network's package is keyed by the shapes
    of its inputs (the residuals' too), not their values, so each is compiled once for the run, not at
    every step; the image is the eager run's. (One run for ControlNet and step caching: compiling is slow.)"""
    import logging

    flags = ["--control", str(files["control"]), "--hint", str(files["hint"]), "--cache_interval", "2"]
    eager = run(files, "txt2img", tmp_path / "eager", *flags)
    with caplog.at_level(logging.INFO, logger="ldm.generation.aot"):
        compiled = run(files, "txt2img", tmp_path / "compiled", *flags, "--compile")
    names = [r.getMessage().split(" ahead of time")[0] for r in caplog.records if "ahead of time for" in r.getMessage()]
    assert sorted(names) == ["compiling ControlNet", "compiling Decoder", "compiling FullStep", "compiling ShallowStep"], names
    assert np.abs(eager[0].astype(int) - compiled[0].astype(int)).max() <= 2
