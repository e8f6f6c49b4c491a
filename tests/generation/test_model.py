"""ldm/generation/model.py: config and checkpoint resolution, model geometry, the compile probe."""

from __future__ import annotations

import pytest
import torch

from ldm.generation import model
from ldm.generation.errors import GenerationError, UsageError
from ldm.generation.settings import ModelSettings


def test_model_geometry_reads_the_modules(tiny_files):
    config = model.read_config(tiny_files["config"])
    g = model.model_geometry(config, tiny_files["config"])
    assert (g.channels, g.vae_factor, g.unet_factor, g.latent_size, g.multiple) == (4, 8, 2, 8, 16)


def test_sd2_config_geometry():
    path = model.REPO_ROOT / model.SD2_CONFIG
    g = model.model_geometry(model.read_config(path), path)
    assert (g.channels, g.vae_factor, g.unet_factor, g.latent_size, g.multiple) == (4, 8, 8, 64, 64)


def _settings(**kw) -> ModelSettings:
    return ModelSettings(device="cpu", **kw)


def test_model_files_demo_default_and_fallback(tiny_files, monkeypatch):
    monkeypatch.setattr(model, "DEMO_CONFIG", tiny_files["config"])
    monkeypatch.setattr(model, "DEMO_CKPT", tiny_files["safetensors"])
    assert model.resolve_model_files(_settings()) == model.ModelFiles(tiny_files["config"], tiny_files["safetensors"], demo=True)
    # Either given: the original behaviour (v2-inference.yaml, --ckpt required).
    files = model.resolve_model_files(_settings(ckpt=tiny_files["ckpt"]))
    assert files.config.name == "v2-inference.yaml" and files.ckpt == tiny_files["ckpt"] and not files.demo
    with pytest.raises(GenerationError, match="--ckpt is required"):
        model.resolve_model_files(_settings(config=tiny_files["config"]))
    assert model.resolve_model_files(_settings(config=tiny_files["config"], random_weights=True)).ckpt is None
    with pytest.raises(UsageError, match="--random_weights and --ckpt exclude each other"):
        model.resolve_model_files(_settings(config=tiny_files["config"], ckpt=tiny_files["ckpt"], random_weights=True))
    monkeypatch.setattr(model, "DEMO_CKPT", tiny_files["config"].parent / "absent.safetensors")
    with pytest.raises(GenerationError, match="--ckpt is required with .*v2-inference.yaml"):
        model.resolve_model_files(_settings())


def test_random_weights_are_the_same_every_run(tiny_files):
    """So that --compile's packages, keyed by the weights, serve the next --random_weights run too;
    the global random state is left as it was."""
    state = torch.get_rng_state()
    nets = [model.Model(_settings(config=tiny_files["config"], random_weights=True, precision="full")).load() for _ in range(2)]
    assert torch.equal(torch.get_rng_state(), state)
    first, second = (n.state_dict() for n in nets)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_compile_probe_failure_is_explained(monkeypatch):
    def broken(fn, **kw):
        raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")

    monkeypatch.setattr(torch, "compile", broken)
    with pytest.raises(GenerationError, match="torch.compile cannot compile for cpu here .*InvalidCxxCompiler.*run without --compile"):
        model.check_compile(torch.device("cpu"))
