"""The DDIM timestep grid and per-step constants, against the original's definitions
(``make_ddim_timesteps``/``make_ddim_sampling_parameters`` of ldm's diffusionmodules/util.py),
and the batched classifier-free guidance call."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ldm.models.diffusion.sampling import (
    DDIMSchedule,
    GuidedModel,
    make_ddim_sampling_parameters,
    make_ddim_timesteps,
)


def test_uniform_timesteps_carry_the_plus_one_offset():
    assert make_ddim_timesteps("uniform", 50, 1000).tolist() == list(range(1, 1000, 20))
    assert make_ddim_timesteps("uniform", 50, 1000)[[0, 1, -1]].tolist() == [1, 21, 981]
    assert make_ddim_timesteps("uniform", 10, 1000).tolist() == [1, 101, 201, 301, 401, 501, 601, 701, 801, 901]


@pytest.mark.parametrize("steps", [1, 7, 30, 250, 500])
def test_uniform_timesteps_follow_the_original_when_steps_do_not_divide(steps):
    # The original: c = T // S; range(0, T, c) + 1, which can hold more than S steps (30 -> 31).
    c = 1000 // steps
    assert make_ddim_timesteps("uniform", steps, 1000).tolist() == [i + 1 for i in range(0, 1000, c)]


def test_quad_timesteps():
    expected = ((np.linspace(0, np.sqrt(1000 * 0.8), 20)) ** 2).astype(int) + 1
    assert np.array_equal(make_ddim_timesteps("quad", 20, 1000), expected)


@pytest.mark.parametrize("bad", [0, 501, 1000, 1001])
def test_impossible_step_counts_are_refused(bad):
    with pytest.raises(ValueError, match="steps"):
        make_ddim_timesteps("uniform", bad, 1000)


def test_final_alpha_is_alphas_cumprod_at_0(tiny_eps_model):
    """The last step (from t=1) lands on alphas_cumprod[0], as in the original (and as
    diffusers' DDIM with set_alpha_to_one=False); every other step on the previous grid point."""
    ac = tiny_eps_model.alphas_cumprod
    ts = make_ddim_timesteps("uniform", 50, 1000)
    sigmas, alphas, alphas_prev = make_ddim_sampling_parameters(ac, ts, eta=0.0)
    # Exact: the constants are the schedule's values, picked out, not computed.
    assert np.array_equal(alphas, ac.double().numpy()[ts])
    assert alphas_prev[0] == ac[0].item()
    assert np.array_equal(alphas_prev[1:], ac.double().numpy()[ts[:-1]])
    assert np.all(sigmas == 0)


def test_sigmas_follow_the_ddim_formula(tiny_eps_model):
    ac = tiny_eps_model.alphas_cumprod.double().numpy()
    ts = make_ddim_timesteps("uniform", 10, 1000)
    sigmas, a, a_prev = make_ddim_sampling_parameters(tiny_eps_model.alphas_cumprod, ts, eta=0.7)
    a_prev_ref = np.concatenate([[ac[0]], ac[ts[:-1]]])
    expected = 0.7 * np.sqrt((1 - a_prev_ref) / (1 - ac[ts]) * (1 - ac[ts] / a_prev_ref))
    assert np.allclose(sigmas, expected, rtol=1e-12)


def test_schedule_constants_are_float32_on_the_model_device(tiny_eps_model):
    schedule = DDIMSchedule(tiny_eps_model, 10)
    for name in ("alphas", "alphas_prev", "sigmas", "sqrt_one_minus_alphas"):
        tensor = getattr(schedule, name)
        assert tensor.dtype == torch.float32 and tensor.device == tiny_eps_model.device and tensor.shape == (10,)
    # NumPy's square root (the schedule's) and PyTorch's are different kernels, which can differ
    # by an ulp on some CPUs: equal to float32 rounding, not bit for bit.
    torch.testing.assert_close(schedule.sqrt_one_minus_alphas, (1.0 - schedule.alphas).sqrt(), rtol=1e-6, atol=0)
    assert schedule.timestep_tensor.tolist() == schedule.timesteps.tolist()


class _Recorder:
    """A stand-in model that records its calls and returns a simple function of its input."""

    def __init__(self):
        self.calls = []

    def apply_model(self, x, t, cond):
        self.calls.append((x.shape[0], cond))
        return x * 2 + cond.mean(dim=(1, 2)).view(-1, 1, 1, 1)


def test_guidance_is_one_batched_call_uncond_first():
    model = _Recorder()
    x = torch.randn(2, 4, 8, 8)
    t = torch.tensor([5, 5])
    c, uc = torch.ones(2, 3, 4), torch.zeros(2, 3, 4)
    out = GuidedModel(model, c, uc, 9.0)(x, t)
    assert len(model.calls) == 1 and model.calls[0][0] == 4
    assert torch.equal(model.calls[0][1], torch.cat([uc, c]))
    out_uncond, out_cond = x * 2, x * 2 + 1
    assert torch.allclose(out, out_uncond + 9.0 * (out_cond - out_uncond))


def test_no_guidance_without_uncond_or_at_scale_1():
    model = _Recorder()
    x, t, c = torch.randn(2, 4, 8, 8), torch.tensor([5, 5]), torch.ones(2, 3, 4)
    GuidedModel(model, c, None, 9.0)(x, t)
    GuidedModel(model, c, torch.zeros(2, 3, 4), 1.0)(x, t)
    assert [n for n, _ in model.calls] == [2, 2]
