"""What a run does when things go wrong: non-finite samples are never written as images and the
error says where they appeared, impossible sizes are refused in seconds by the memory estimate,
and SIGTERM stops a run like Ctrl-C, keeping every whole image."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import ROOT, assert_valid_pngs, child_env, samples, wait_for
from ldm.checkpoint import load_state_dict, save_state_dict
from ldm.generation import main, memory
from ldm.generation.errors import GenerationError
from ldm.generation.model import Model
from ldm.generation.pipeline import Pipeline
from ldm.generation.settings import ModelSettings, SamplingSettings
from ldm.generation.tasks import Txt2ImgPipeline

FAST = ["--H", "64", "--W", "64", "--steps", "2", "--n_samples", "1", "--n_iter", "1", "--precision", "full"]


def poisoned(tiny_files, tmp_path: Path, prefix: str) -> Path:
    """The tiny checkpoint with NaN in the first weight under ``prefix``."""
    state = load_state_dict(tiny_files["safetensors"])
    key = next(k for k in state if k.startswith(prefix) and k.endswith("weight"))
    state[key] = torch.full_like(state[key], float("nan"))
    path = tmp_path / f"nan-{prefix.rstrip('.')}.safetensors"
    save_state_dict(state, path)
    return path


@pytest.mark.parametrize(
    "prefix, where",
    [
        ("cond_stage_model.", "the text encoder's output produced NaN or inf values"),
        ("model.diffusion_model.", "the UNet at sampling step 1 of 2 produced NaN or inf values"),
        ("first_stage_model.decoder.", "the decoder produced NaN or inf values"),
    ],
)
def test_non_finite_samples_are_never_written(tiny_files, tmp_path, capsys, prefix, where):
    ckpt = poisoned(tiny_files, tmp_path, prefix)
    out = tmp_path / "out"
    status = main(["--config", str(tiny_files["config"]), "--ckpt", str(ckpt), "--outdir", str(out), *FAST], "txt2img")
    err = capsys.readouterr().err
    assert status == 1
    assert "iteration 1, batch 1" in err and where in err and "--precision full" in err, err
    assert not list(out.rglob("*.png"))


def test_images_before_a_non_finite_batch_are_kept(tiny_files, tmp_path, capsys, monkeypatch):
    sample = Pipeline.sample
    calls = []

    def second_goes_bad(self, *args, **kwargs):
        calls.append(1)
        z = sample(self, *args, **kwargs)
        return z * float("inf") if len(calls) == 2 else z

    monkeypatch.setattr(Pipeline, "sample", second_goes_bad)
    out = tmp_path / "out"
    flags = ["--config", str(tiny_files["config"]), "--ckpt", str(tiny_files["safetensors"]), "--outdir", str(out), *FAST]
    assert main([*flags, "--n_iter", "3"], "txt2img") == 1
    err = capsys.readouterr().err
    assert "iteration 2, batch 1" in err and "the 1 image written before it is kept" in err
    [kept] = sorted((out / "samples").glob("*.png"))
    with Image.open(kept) as image:
        image.load()
        assert image.getextrema() != ((0, 0), (0, 0), (0, 0))


def test_impossible_size_is_refused_before_sampling(tiny_files, tmp_path, capsys, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("sampled although the estimate says the size cannot fit")

    monkeypatch.setattr(Pipeline, "sample", refuse)
    out = tmp_path / "out"
    status = main(["--config", str(tiny_files["config"]), "--ckpt", str(tiny_files["safetensors"]), "--outdir", str(out),
                   "--H", "65536", "--W", "65536", "--n_samples", "1", "--precision", "full"], "txt2img")
    err = capsys.readouterr().err
    assert status == 1 and "65536x65536 at --n_samples 1 needs about" in err and "largest square image that fits" in err, err
    assert not out.exists()


def test_estimate_names_a_batch_that_fits(tiny_files, monkeypatch):
    model = Model(ModelSettings(config=tiny_files["config"], ckpt=tiny_files["safetensors"], device="cpu", precision="full"))
    monkeypatch.setattr(memory, "DEFAULT_TILE", 8)  # small tiles: the UNet's activations decide
    one, four = (memory.estimate(model, 256, 256, b, True, 1, 8) for b in (1, 4))
    assert one.total < four.total and four.unet > 3 * one.unet  # activations grow with the batch; weights do not
    monkeypatch.setattr(memory, "available_memory", lambda device: (one.total + four.total) // 2)
    pipeline = Txt2ImgPipeline(model, SamplingSettings(), n_samples=4, height=256, width=256, vae_slice_size=4)
    with pytest.raises(GenerationError, match=r"--n_samples [1-3] fits at 256x256"):
        memory.check_fits(pipeline, guided=True)


def test_decoder_too_large_for_memory_decodes_in_tiles(tiny_files, monkeypatch):
    model = Model(ModelSettings(config=tiny_files["config"], ckpt=tiny_files["safetensors"], device="cpu", precision="full"))
    whole = memory.estimate(model, 1024, 1024, 1, True, 1)
    tiled = memory.estimate(model, 1024, 1024, 1, True, 1, 16)
    assert tiled.decoder < whole.decoder / 4
    monkeypatch.setattr(memory, "available_memory", lambda device: (whole.total + tiled.total) // 2)
    monkeypatch.setattr(memory, "DEFAULT_TILE", 16)
    pipeline = Txt2ImgPipeline(model, SamplingSettings(), height=1024, width=1024)
    memory.check_fits(pipeline, guided=True)
    assert (pipeline.vae_tile_size, pipeline.vae_slice_size) == (16, 1)


def test_vanilla_attention_needs_the_score_matrix(tiny_files):
    def unet_bytes(attention):
        settings = ModelSettings(config=tiny_files["config"], random_weights=True, device="cpu", attention=attention, precision="full")
        return memory.estimate(Model(settings), 512, 512, 1, True, 1).unet

    tokens = (512 // 8) ** 2
    assert unet_bytes("vanilla") - unet_bytes("sdpa") >= 2 * 2 * tokens**2 * 4  # two fp32 maps, batch 2, >= 1 head


def test_sigterm_stops_cleanly_and_keeps_whole_images(tiny_files, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "scripts" / "txt2img.py"), "--config", str(tiny_files["config"]),
           "--ckpt", str(tiny_files["safetensors"]), "--outdir", str(out), *FAST, "--n_iter", "500"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env())
    try:
        wait_for(lambda: samples(out), timeout=300, alive=lambda: proc.poll() is None, what="a first image")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM
    assert "terminated by SIGTERM (images written so far are complete)" in err and "Traceback" not in err
    written = samples(out)
    assert 1 <= len(written) < 500 and not list(out.rglob("*.tmp"))
    assert_valid_pngs(written)
