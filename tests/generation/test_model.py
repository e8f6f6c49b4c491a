"""ldm/generation/model.py: config and checkpoint resolution, model geometry, the compile probe."""

from __future__ import annotations

import argparse

import pytest
import torch

from ldm.generation import model, options
from ldm.generation.errors import GenerationError


def test_model_geometry_reads_the_modules(tiny_files):
    config = model.read_config(tiny_files["config"])
    g = model.model_geometry(config, tiny_files["config"])
    assert (g.channels, g.vae_factor, g.unet_factor, g.latent_size, g.multiple) == (4, 8, 2, 8, 16)


def test_sd2_config_geometry():
    path = model.REPO_ROOT / model.SD2_CONFIG
    g = model.model_geometry(model.read_config(path), path)
    assert (g.channels, g.vae_factor, g.unet_factor, g.latent_size, g.multiple) == (4, 8, 8, 64, 64)


def _args(**kw) -> argparse.Namespace:
    """Parsed txt2img flags; ``name=True`` for a switch."""
    argv = [f"--{k}" if v is True else f"--{k}={v}" for k, v in kw.items()]
    return options.build_parser("txt2img").parse_args(["--device", "cpu", *argv])


def test_model_files_demo_default_and_fallback(tiny_files, monkeypatch):
    monkeypatch.setattr(model, "DEMO_CONFIG", tiny_files["config"])
    monkeypatch.setattr(model, "DEMO_CKPT", tiny_files["safetensors"])
    assert model.resolve_model_files(_args()) == model.ModelFiles(tiny_files["config"], tiny_files["safetensors"], demo=True)
    # Either flag given: the original behaviour (v2-inference.yaml, --ckpt required).
    files = model.resolve_model_files(_args(ckpt=tiny_files["ckpt"]))
    assert files.config.name == "v2-inference.yaml" and files.ckpt == tiny_files["ckpt"] and not files.demo
    with pytest.raises(GenerationError, match="--ckpt is required"):
        model.resolve_model_files(_args(config=tiny_files["config"]))
    assert model.resolve_model_files(_args(config=tiny_files["config"], random_weights=True)).ckpt is None
    monkeypatch.setattr(model, "DEMO_CKPT", tiny_files["config"].parent / "absent.safetensors")
    with pytest.raises(GenerationError, match="--ckpt is required with .*v2-inference.yaml"):
        model.resolve_model_files(_args())


def test_compile_probe_failure_is_explained(monkeypatch):
    def broken(fn, **kw):
        raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")

    monkeypatch.setattr(torch, "compile", broken)
    with pytest.raises(GenerationError, match="torch.compile cannot compile for cpu here .*InvalidCxxCompiler.*run without --compile"):
        model.check_compile(torch.device("cpu"))
