"""The VAE posterior: the original's parameter split, clamping, sampling stream and KL."""

from __future__ import annotations

import torch

from ldm.modules.distributions.distributions import DiagonalGaussianDistribution


def params(seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 8, 4, 4, generator=torch.Generator().manual_seed(seed))


def test_split_and_clamp():
    p = params()
    p[:, 4:, 0, 0] = 50.0  # log-variance beyond the clamp
    d = DiagonalGaussianDistribution(p)
    assert torch.equal(d.mean, p[:, :4]) and torch.equal(d.mode(), p[:, :4])
    assert d.logvar.max() == 20.0
    assert torch.allclose(d.std, torch.exp(0.5 * d.logvar)) and torch.allclose(d.var, torch.exp(d.logvar))


def test_sample_uses_the_global_cpu_stream_like_the_original():
    d = DiagonalGaussianDistribution(params())
    torch.manual_seed(123)
    sample = d.sample()
    torch.manual_seed(123)
    expected = d.mean + d.std * torch.randn(d.mean.shape)
    assert torch.equal(sample, expected)  # bit for bit: the same operations on the same draws
    gen = torch.Generator().manual_seed(9)
    assert torch.equal(d.sample(gen), d.mean + d.std * torch.randn(d.mean.shape, generator=torch.Generator().manual_seed(9)))


def test_kl_matches_torch_distributions():
    p, q = DiagonalGaussianDistribution(params(0)), DiagonalGaussianDistribution(params(1))
    normal = torch.distributions.Normal
    ref_std = torch.distributions.kl_divergence(normal(p.mean, p.std), normal(0.0, 1.0)).sum(dim=[1, 2, 3])
    ref_pq = torch.distributions.kl_divergence(normal(p.mean, p.std), normal(q.mean, q.std)).sum(dim=[1, 2, 3])
    assert torch.allclose(p.kl(), ref_std, rtol=1e-5)
    assert torch.allclose(p.kl(q), ref_pq, rtol=1e-5)


def test_deterministic_posterior():
    d = DiagonalGaussianDistribution(params(), deterministic=True)
    assert torch.equal(d.sample(), d.mean)
    assert torch.equal(d.kl(), torch.zeros(2))
