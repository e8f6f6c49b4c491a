"""ldm/generation/speed.py: the precision chosen on CPUs with and without native bfloat16 (the
capability query monkeypatched), UNet weights held in bfloat16 (bit-identical under autocast),
the UNet compiled for frozen inference weights against eager (and with it the VAE decoder, a whole
generation against eager; these compilations are marked slow), and inductor's on-disk cache folder (the packages: test_aot.py).

Tolerances: compiled float32 against eager float32, 1e-4 of the output's scale (as tests/test_compile.py:
float32 rounding reordered by fusion); bfloat16 (autocast) against float32, 3e-2 of the output's
scale (bfloat16 keeps 8 bits of mantissa, ~4e-3 per rounding; observed ~8e-3 on the tiny UNet, eager
and compiled alike); compiled bfloat16 against eager bfloat16, the same 3e-2 (inductor fuses the
float32 GroupNorm and the casts around it, so roundings differ)."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

from conftest import child_env, rel_max, tiny_model, unet_inputs
from ldm.generation import speed
from ldm.generation.model import Model
from ldm.generation.settings import ModelSettings


@pytest.fixture()
def fresh_log(monkeypatch):
    monkeypatch.setattr(speed, "_told_fp32", False)


def test_capability_query_is_torchs():
    assert isinstance(speed.cpu_has_native_bf16(), bool)
    text = speed.cpu_description()
    assert "native bf16 " + ("yes" if speed.cpu_has_native_bf16() else "no") in text


def test_default_precision_is_float32_on_a_cpu_without_native_bf16(monkeypatch, caplog, fresh_log):
    monkeypatch.setattr(speed, "cpu_has_native_bf16", lambda: False)
    with caplog.at_level(logging.INFO, logger="ldm.generation.speed"):
        assert speed.resolve_precision("autocast", "cpu") == "full"
        assert speed.resolve_precision("autocast", torch.device("cpu")) == "full"
    assert len([r for r in caplog.records if "no native bfloat16" in r.getMessage()]) == 1  # said once
    assert speed.resolve_precision("bf16", "cpu") == "bf16"  # asked for explicitly: kept
    assert speed.resolve_precision("full", "cpu") == "full"
    assert speed.resolve_precision("autocast", "cuda") == "autocast"  # the GPU is not concerned


def test_default_precision_is_bf16_autocast_on_a_cpu_with_native_bf16(monkeypatch, caplog, fresh_log):
    monkeypatch.setattr(speed, "cpu_has_native_bf16", lambda: True)
    with caplog.at_level(logging.INFO, logger="ldm.generation.speed"):
        assert speed.resolve_precision("autocast", "cpu") == "autocast"
    assert not caplog.records


@pytest.mark.parametrize("native", [False, True], ids=["no-native-bf16", "native-bf16"])
def test_model_follows_the_capability(tiny_files, monkeypatch, fresh_log, native):
    monkeypatch.setattr(speed, "cpu_has_native_bf16", lambda: native)
    model = Model(ModelSettings(config=tiny_files["config"], ckpt=tiny_files["safetensors"], device="cpu"))
    assert model.computes_in == ("autocast" if native else "full")
    net = model.load()
    dtypes = {p.dtype for p in net.model.diffusion_model.parameters()}
    assert dtypes == ({torch.bfloat16, torch.float32} if native else {torch.float32})  # norms keep float32
    assert {p.dtype for p in net.cond_stage_model.parameters()} == {torch.float32}
    with model.precision():
        assert torch.is_autocast_enabled("cpu") == native
        if native:
            assert torch.get_autocast_dtype("cpu") == torch.bfloat16


def test_held_weights_give_autocasts_results_exactly():
    unet = tiny_model().model.diffusion_model
    held = copy.deepcopy(unet)
    assert speed.hold_weights(held) > 0
    assert {type(m) for m in held.modules() if any(p.dtype == torch.bfloat16 for p in m.parameters(recurse=False))} <= set(speed.HELD_LAYERS)
    assert all(p.dtype == torch.float32 for n, p in held.named_parameters() if "norm" in n)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(held(*unet_inputs()), unet(*unet_inputs()))
    with torch.no_grad():  # outside autocast the UNet computes in its weights' dtype
        assert rel_max(held(*unet_inputs()), unet(*unet_inputs())) < 3e-2


def test_held_weights_give_the_same_images(tiny_files, monkeypatch, fresh_log):
    """A whole txt2img generation under the default precision, weights held or cast per call."""
    from ldm.generation.run import seed_everything
    from ldm.generation.settings import SamplingSettings
    from ldm.generation.tasks import Txt2ImgPipeline

    monkeypatch.setattr(speed, "cpu_has_native_bf16", lambda: True)
    images = []
    for hold in (True, False):
        if not hold:
            monkeypatch.setattr("ldm.generation.model.hold_weights", lambda *a, **k: 0)
        model = Model(ModelSettings(config=tiny_files["config"], ckpt=tiny_files["safetensors"], device="cpu"))
        pipeline = Txt2ImgPipeline(model, SamplingSettings(sampler="plms", steps=4), n_samples=1, height=64, width=64)
        with torch.no_grad(), model.precision():
            seed_everything(1)
            pipeline.start()
            images.append(pipeline(["a red circle"]))
        assert (model.net.model.diffusion_model.out[2].weight.dtype == torch.bfloat16) == hold
    assert torch.equal(images[0], images[1])


def test_inductor_options():
    options = speed.inductor_options("cpu")
    assert options == {"freezing": True}
    autotune = speed.inductor_options("cpu", "max-autotune")
    assert autotune["freezing"] and autotune["max_autotune"] and not any(k.startswith("triton.") for k in autotune)
    assert speed.inductor_options("cuda", "max-autotune") is None  # the mode as is


@pytest.mark.slow
def test_compiled_weights_are_frozen_and_prepacked():
    """--compile on the CPU really freezes: oneDNN-prepacked convolution and linear weights (passing
    ``freezing`` only as a torch.compile option froze nothing) and no change to the global config."""
    import torch._inductor.config as inductor_config
    from torch._dynamo.utils import counters

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.SiLU(), torch.nn.Flatten(),
                              torch.nn.Linear(8 * 6 * 6, 5)).eval()
    x = torch.randn(2, 3, 6, 6)
    torch._dynamo.reset()
    counters.clear()
    with torch.no_grad():
        expected = net(x)
        compiled = speed.compile_module(copy.deepcopy(net), "cpu")
        assert rel_max(compiled(x), expected) <= 1e-4
    assert counters["inductor"]["mkldnn_conv_weight_pack_matcher_count"] == 1
    assert counters["inductor"]["mkldnn_linear_weight_pack_matcher_count"] == 1
    assert not inductor_config.freezing


def test_cache_folder(monkeypatch, tmp_path):
    monkeypatch.delenv(speed.CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert speed.compile_cache_dir() == tmp_path / "xdg" / "ldm-sd2" / "torchinductor"
    assert speed.use_compile_cache() == tmp_path / "xdg" / "ldm-sd2" / "torchinductor"
    import os

    assert os.environ[speed.CACHE_ENV] == str(tmp_path / "xdg" / "ldm-sd2" / "torchinductor")
    # Importing torch._dynamo fills in PyTorch's own default under /tmp when the variable is unset:
    # that is no choice of the user's, and our folder replaces it.
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    monkeypatch.setenv(speed.CACHE_ENV, default_cache_dir())
    assert speed.use_compile_cache() == tmp_path / "xdg" / "ldm-sd2" / "torchinductor"
    assert os.environ[speed.CACHE_ENV] == str(tmp_path / "xdg" / "ldm-sd2" / "torchinductor")
    monkeypatch.setenv(speed.CACHE_ENV, str(tmp_path / "mine"))  # the user's choice wins
    assert speed.use_compile_cache() == tmp_path / "mine"
    assert os.environ[speed.CACHE_ENV] == str(tmp_path / "mine")
    import torch._inductor.config as inductor_config

    assert inductor_config.fx_graph_cache


def test_cache_folder_survives_torchs_import(tmp_path):
    """In a fresh process whose environment names no folder, importing torch._dynamo (as generation
    does before compiling) fills in PyTorch's /tmp default; --compile's folder is still ours."""
    import subprocess
    import sys

    env = {k: v for k, v in child_env(XDG_CACHE_HOME=str(tmp_path)).items() if k != speed.CACHE_ENV}
    code = ("import os, torch._dynamo; from ldm.generation import speed; print(os.environ.get(speed.CACHE_ENV)); "
            "print(speed.use_compile_cache()); print(os.environ[speed.CACHE_ENV])")
    filled, chosen, env_after = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                               check=True, timeout=120).stdout.split()
    ours = str(tmp_path / "ldm-sd2" / "torchinductor")
    assert filled != ours and chosen == ours and env_after == ours


@pytest.fixture(scope="module")
def compiled_pair():
    """The tiny UNet eager and compiled as --compile does (freezing), float32; and held in bf16, compiled."""
    unet = tiny_model().model.diffusion_model
    torch._dynamo.reset()
    fp32 = speed.compile_module(copy.deepcopy(unet), "cpu")
    bf16 = copy.deepcopy(unet)
    speed.hold_weights(bf16)
    return unet, fp32, speed.compile_module(bf16, "cpu")


@pytest.mark.slow
def test_compiled_float32_equals_eager(compiled_pair):
    unet, fp32, _ = compiled_pair
    with torch.no_grad():
        assert rel_max(fp32(*unet_inputs()), unet(*unet_inputs())) <= 1e-4


@pytest.mark.slow
def test_compiled_bf16_against_eager(compiled_pair):
    unet, _, bf16 = compiled_pair
    with torch.no_grad():
        reference = unet(*unet_inputs())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            compiled = bf16(*unet_inputs())
            eager = unet(*unet_inputs())
    assert compiled.dtype == torch.float32 and torch.isfinite(compiled).all()
    assert rel_max(compiled, reference) <= 3e-2
    assert rel_max(compiled, eager) <= 3e-2


@pytest.mark.slow
def test_compile_covers_the_unet_and_on_the_cpu_the_vae_decoder(tiny_files):
    """--compile on the CPU: the UNet and the VAE decoder compiled (frozen), the images those of eager
    float32 to 1e-4 (fusion reorders float32 roundings; the images are in [0, 1])."""
    from ldm.generation.run import seed_everything
    from ldm.generation.settings import SamplingSettings
    from ldm.generation.tasks import Txt2ImgPipeline

    torch._dynamo.reset()
    images = []
    for compile in (False, True):
        model = Model(ModelSettings(config=tiny_files["config"], ckpt=tiny_files["safetensors"], device="cpu",
                                    precision="full", compile=compile))
        pipeline = Txt2ImgPipeline(model, SamplingSettings(sampler="plms", steps=4), n_samples=1, height=64, width=64)
        with torch.no_grad():
            seed_everything(1)
            pipeline.start()
            images.append(pipeline(["a red circle"]))
        net = model.net
        compiled = ["forward" in vars(m) for m in (net.model.diffusion_model, net.first_stage_model.decoder)]  # replaced in place
        assert compiled == [compile, compile]
    assert (images[1] - images[0]).abs().max() <= 1e-4
