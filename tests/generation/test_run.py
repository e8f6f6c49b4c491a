"""ldm/generation/run.py and pipeline.py: VAE slicing, the conditioning of repeated prompts and seeding (whole runs are tested in tests/scripts/)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from ldm.generation import run
from ldm.generation.model import Model
from ldm.generation.settings import ModelSettings, SamplingSettings
from ldm.generation.tasks import Txt2ImgPipeline


def test_vae_slices_decode_as_one_batch(tiny_files):
    model = Model(ModelSettings(config=tiny_files["config"], ckpt=tiny_files["safetensors"], device="cpu"))
    z = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        whole = Txt2ImgPipeline(model, SamplingSettings(), vae_slice_size=8).decode(z)
        sliced = Txt2ImgPipeline(model, SamplingSettings(), vae_slice_size=2).decode(z)
    assert whole.shape == (3, 3, 64, 64) and whole.min() >= 0 and whole.max() <= 1
    # Convolutions may pick other algorithms per batch size: equal to float rounding.
    torch.testing.assert_close(sliced, whole, rtol=0, atol=1e-5)


@pytest.mark.parametrize("scale", [9.0, 1.0], ids=["guided", "unguided"])
def test_each_distinct_prompt_is_encoded_once(tiny_files, monkeypatch, scale):
    """The conditioning of a batch with repeated prompts: the text encoder sees each distinct prompt
    once and the empty one once per model and autocast state; the rows equal the original's
    one-per-copy encoding to 1e-5 of their scale (float32; another batch size may round the encoder's
    matmuls differently)."""
    model = Model(ModelSettings(config=tiny_files["config"], ckpt=tiny_files["safetensors"], device="cpu"))
    encode = model.load().get_learned_conditioning
    encoder = model.prompts
    encode_prompts = encoder.encode
    seen = []
    monkeypatch.setattr(encoder, "encode", lambda texts, chunks=1: seen.append(list(texts)) or encode_prompts(texts, chunks))
    prompts = ["a red circle", "a blue square", "a red circle", "a red circle"]
    with torch.no_grad():
        c, uc = Txt2ImgPipeline(model, SamplingSettings(scale=scale)).conditioning(prompts)
        expected_c, expected_uc = encode(prompts), encode(len(prompts) * [""])
    assert seen == [["a red circle", "a blue square"], [""]][: 2 if scale != 1.0 else 1]
    torch.testing.assert_close(c, expected_c, rtol=0, atol=1e-5 * expected_c.abs().max().item())
    if scale == 1.0:
        assert uc is None
        return
    torch.testing.assert_close(uc, expected_uc, rtol=0, atol=1e-5 * expected_uc.abs().max().item())
    seen.clear()
    with torch.no_grad():
        _, again = Txt2ImgPipeline(model, SamplingSettings(scale=scale), n_samples=2).conditioning(["a red circle"] * 2)
        assert seen == [["a red circle"]] and torch.equal(again, uc[:2])  # the empty prompt's encoding is kept
        with torch.autocast("cpu", dtype=torch.bfloat16):
            Txt2ImgPipeline(model, SamplingSettings(scale=scale)).conditioning(["a red circle"])
    assert seen == [["a red circle"], ["a red circle"], [""]]  # another precision: encoded again


def test_seed_everything_seeds_python_numpy_and_torch():
    draws = []
    for _ in range(2):
        run.seed_everything(7)
        draws.append((random.random(), np.random.rand(), torch.rand(1).item()))
    assert draws[0] == draws[1]
