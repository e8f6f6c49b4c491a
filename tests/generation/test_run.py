"""ldm/generation/run.py and pipeline.py: VAE slicing and seeding (whole runs are tested in tests/scripts/)."""

from __future__ import annotations

import random

import numpy as np
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


def test_seed_everything_seeds_python_numpy_and_torch():
    draws = []
    for _ in range(2):
        run.seed_everything(7)
        draws.append((random.random(), np.random.rand(), torch.rand(1).item()))
    assert draws[0] == draws[1]
