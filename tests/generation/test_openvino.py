"""--compile_backend openvino (ldm/generation/openvino.py): the tiny UNet compiled by OpenVINO against
the eager float32 UNet, its silent fallback to inductor made an error, the run fed float32 and its
image against the eager one.

Tolerance: OpenVINO computes in its own precision, bfloat16 on CPUs with AVX-512 BF16 or AMX (float32
elsewhere): 3e-2 of the largest output, as the bfloat16 compiled UNet (tests/generation/test_speed.py).
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from conftest import rel_max, sample_images, tiny_model, unet_inputs
from ldm.generation import main
from ldm.generation.errors import GenerationError

pytest.importorskip("openvino", reason="--compile_backend openvino needs openvino: pip install -e '.[openvino]'")

from ldm.generation import openvino as ov  # noqa: E402


@pytest.mark.slow
def test_the_openvino_unet_is_the_eager_one():
    unet = tiny_model().model.diffusion_model
    compiled = ov.compile_openvino(copy.deepcopy(unet), "cpu")
    torch._dynamo.reset()
    with torch.no_grad():
        expected = unet(*unet_inputs())
        assert rel_max(compiled(*unet_inputs()), expected) <= 3e-2


def test_a_fallback_to_inductor_is_an_error(monkeypatch):
    import openvino.frontend.pytorch.torchdynamo.backend as backend

    monkeypatch.setattr(backend, "fx_openvino", lambda graph, inputs, options=None: graph.forward)  # what its fallback returns
    module = torch.nn.Linear(4, 4)
    ov.compile_openvino(module, "cpu")
    torch._dynamo.reset()
    with pytest.raises(Exception, match="OpenVINO could not convert the Linear"), torch.no_grad():
        module(torch.ones(1, 4))
    torch._dynamo.reset()


def test_openvino_is_cpu_only_and_named_when_missing(monkeypatch):
    from ldm.generation.errors import UsageError
    from ldm.generation.model import check_settings
    from ldm.generation.settings import ModelSettings

    with pytest.raises(UsageError, match="runs on the CPU: add --device cpu"):  # refused before anything loads
        check_settings(ModelSettings(device="cuda", compile=True, compile_backend="openvino"))
    with pytest.raises(GenerationError, match="runs on the CPU"):
        ov.compile_openvino(torch.nn.Linear(2, 2), "cuda")
    monkeypatch.setattr(ov.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(GenerationError, match="needs the openvino package: pip install openvino"):
        ov.compile_openvino(torch.nn.Linear(2, 2), "cpu")


@pytest.mark.slow
def test_txt2img_with_openvino_is_fed_float32(tiny_files, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "cache"))
    argv = ["--config", str(tiny_files["config"]), "--ckpt", str(tiny_files["safetensors"]), "--H", "64", "--W", "64", "--steps", "4",
            "--n_samples", "1", "--n_iter", "1", "--seed", "3", "--no_watermark", "--prompt", "a box"]
    assert main([*argv, "--outdir", str(tmp_path / "eager"), "--precision", "full"], "txt2img") == 0
    assert main([*argv, "--outdir", str(tmp_path / "ov"), "--compile", "--compile_backend", "openvino",
                 "--stats_file", str(tmp_path / "stats.json")], "txt2img") == 0
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["precision"] == "full" and stats["compile_backend"] == "openvino"
    [eager], [compiled] = sample_images(tmp_path / "eager"), sample_images(tmp_path / "ov")
    assert np.abs(eager.astype(int) - compiled.astype(int)).mean() <= 2.0
