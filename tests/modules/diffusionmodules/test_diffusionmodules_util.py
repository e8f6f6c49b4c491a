"""Building blocks of ldm.modules.diffusionmodules.util against the original's formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ldm.modules.diffusionmodules import util
from ldm.modules.diffusionmodules.util import GroupNorm32, make_beta_schedule, timestep_embedding


def test_linear_schedule_is_linear_in_sqrt_beta():
    expected = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    betas = make_beta_schedule("linear", 1000, 0.00085, 0.012)
    assert betas.dtype == np.float64
    assert np.allclose(betas, expected, rtol=1e-14, atol=0)
    assert betas[0] == pytest.approx(0.00085, rel=1e-12) and betas[-1] == pytest.approx(0.012, rel=1e-12)


def test_other_schedules_of_the_original():
    assert np.allclose(make_beta_schedule("sqrt_linear", 10, 1e-4, 2e-2), np.linspace(1e-4, 2e-2, 10))
    assert np.allclose(make_beta_schedule("sqrt", 10, 1e-4, 2e-2), np.linspace(1e-4, 2e-2, 10) ** 0.5)
    s, n = 8e-3, 50
    f = np.cos((np.arange(n + 1) / n + s) / (1 + s) * np.pi / 2) ** 2
    f = f / f[0]
    assert np.allclose(make_beta_schedule("cosine", n, cosine_s=s), np.clip(1 - f[1:] / f[:-1], 0, 0.999))
    with pytest.raises(ValueError, match="nope"):
        make_beta_schedule("nope", 10)


@pytest.mark.parametrize("dim", [32, 33])
def test_timestep_embedding_is_the_original_cos_sin_layout(dim):
    t = torch.tensor([0.0, 1.0, 457.5, 999.0])
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None] * freqs[None]
    expected = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        expected = torch.cat([expected, torch.zeros(4, 1)], dim=-1)
    # Bit for bit: the same PyTorch operations in the same order (diffusers' version, below, is another).
    assert torch.equal(timestep_embedding(t, dim), expected)


def test_timestep_embedding_matches_diffusers():
    from diffusers.models.embeddings import get_timestep_embedding

    t = torch.tensor([1, 250, 999])
    ref = get_timestep_embedding(t, 320, flip_sin_to_cos=True, downscale_freq_shift=0)
    assert torch.allclose(timestep_embedding(t, 320), ref, atol=1e-6)


def test_groupnorm32_computes_in_float32():
    norm = GroupNorm32(32, 64)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-1, 1)
    x = torch.randn(2, 64, 4, 4) * 100
    out = norm(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, norm(x.to(torch.bfloat16).float()).to(torch.bfloat16))


def test_checkpoint_only_when_gradients_are_recorded(monkeypatch):
    calls = []

    def spy(function, *args, **kwargs):
        calls.append(kwargs)
        return function(*args)

    monkeypatch.setattr(util, "_torch_checkpoint", spy)
    layer = torch.nn.Linear(3, 3)
    x = torch.randn(2, 3)
    with torch.no_grad():
        util.checkpoint(layer, (x,), True)
    assert calls == []
    util.checkpoint(layer, (x,), False)
    assert calls == []
    util.checkpoint(layer, (x,), True)
    assert calls == [{"use_reentrant": False}]


def test_zero_module():
    layer = util.zero_module(torch.nn.Linear(3, 3))
    assert all((p == 0).all() for p in layer.parameters())
