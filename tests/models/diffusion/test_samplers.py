"""The sampler registry and its one interface (ldm/models/diffusion/samplers.py, sampling.Sampler):
names as users spell them, what a run costs (steps, UNet calls, batch of guidance), the starting
noise every sampler shares with the original's draw, img2img's start part way down a schedule, and
no device read inside any sampler's loop."""

from __future__ import annotations

import math

import pytest
import torch

from ldm.models.diffusion.samplers import SAMPLERS, parse_sampler, sampler_named
from ldm.models.diffusion.sampling import SampleRequest
from ldm.models.diffusion.schedules import ModelSigmas, schedule_named

STEPS = 4


@pytest.mark.parametrize("spelled, parsed", [
    ("DPM++ 2M Karras", ("dpmpp_2m", "karras")),
    ("dpm++ 2m  karras", ("dpmpp_2m", "karras")),
    ("Euler a", ("euler_ancestral", None)),
    ("k_euler_a", ("euler_ancestral", None)),
    ("k_dpmpp_2m", ("dpmpp_2m", None)),
    ("DPM++ 2M SDE Exponential", ("dpmpp_2m_sde", "exponential")),
    ("DPM++ SDE", ("dpmpp_sde", None)),
    ("DPM2 a Karras", ("dpm_2_ancestral", "karras")),
    ("Euler SGM Uniform", ("euler", "trailing")),
    ("UniPC", ("unipc", None)),
    ("DDIM", ("ddim", None)),
    ("plms", ("plms", None)),
])  # fmt: skip
def test_names_as_users_spell_them(spelled, parsed):
    assert parse_sampler(spelled) == parsed


def test_an_unknown_name_lists_the_choices():
    with pytest.raises(ValueError, match=r"unknown sampler 'DPM fast'; choose one of ddim, plms, dpm \(DPM-Solver\+\+ \(2M\)\)"):
        parse_sampler("DPM fast")
    assert sampler_named("Euler a") is SAMPLERS["euler_ancestral"]


def test_every_sampler_says_what_it_runs_on():
    for name, sampler in SAMPLERS.items():
        assert sampler.name == name and sampler.title and sampler.schedules, name
        if name not in ("ddim", "plms", "dpm"):
            assert set(sampler.schedules) == {"uniform", "karras", "exponential", "trailing", "normal", "simple", "beta", "turbo"}
            assert sampler.starts_midway
    assert [n for n, s in SAMPLERS.items() if not s.starts_midway] == ["plms", "dpm"]
    assert {n for n, s in SAMPLERS.items() if s.default_eta is not None} == {
        "ddim", "euler_ancestral", "dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_sde", "dpmpp_2m_sde", "dpmpp_3m_sde"}


class Recorder:
    """Wraps a model's apply_model: records each call's batch, timestep and input, and the conditioning."""

    def __init__(self, model, monkeypatch):
        self.calls: list[tuple[int, torch.Tensor, torch.Tensor, object]] = []
        original = model.apply_model

        def apply_model(x, t, cond):
            self.calls.append((x.shape[0], t.clone(), x.clone(), cond))
            return original(x, t, cond)

        monkeypatch.setattr(model, "apply_model", apply_model)


def request(inputs, scale: float = 9.0, steps: int = STEPS, **options) -> SampleRequest:
    uncond = inputs["uc"] if scale != 1.0 else None
    return SampleRequest(cond=inputs["c"], uncond=uncond, scale=scale, steps=steps, shape=tuple(inputs["x_T"].shape), **options)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_steps_unet_calls_and_the_starting_noise(name, tiny_eps_model, guidance_inputs, monkeypatch):
    """A run calls the UNet as often as ``unet_calls`` says, with cond and uncond in one batch, reports
    every step, and starts from the original's first draw (x_T as DDIM takes it: the first UNet
    input, in the variance-preserving form, is that draw for every sampler)."""
    sampler, recorder, steps_seen = SAMPLERS[name], Recorder(tiny_eps_model, monkeypatch), []
    schedule = sampler.schedules[0]
    torch.manual_seed(3)
    expected_start = torch.randn(guidance_inputs["x_T"].shape)
    torch.manual_seed(3)
    with torch.no_grad():
        out = sampler.sample(tiny_eps_model, request(guidance_inputs, schedule=schedule, callback=lambda i, x: steps_seen.append(i)))
    run_steps = sampler.run_steps(STEPS, schedule, 1000)
    assert len(recorder.calls) == sampler.unet_calls(run_steps)
    assert steps_seen == list(range(run_steps))
    assert all(batch == 4 for batch, *_ in recorder.calls)  # batch 2, guided: one doubled call
    torch.testing.assert_close(recorder.calls[0][2][:2], expected_start, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(out).all() and out.shape == (2, 4, 8, 8)


@pytest.mark.parametrize("name", ["ddim", "euler", "dpmpp_2m", "heun"])
@pytest.mark.parametrize("scale", [1.0, 0.0])
def test_without_guidance_one_plain_batch_per_call(name, scale, tiny_eps_model, guidance_inputs, monkeypatch):
    """Scale 1: the conditional prediction alone; scale 0: the unconditional one (the formula's value)."""
    recorder = Recorder(tiny_eps_model, monkeypatch)
    r = request(guidance_inputs, scale=scale, noise=guidance_inputs["x_T"])
    with torch.no_grad():
        SAMPLERS[name].sample(tiny_eps_model, r)
    expected_cond = guidance_inputs["c"] if scale == 1.0 else guidance_inputs["uc"]
    assert all(batch == 2 for batch, *_ in recorder.calls)
    assert all(cond is expected_cond for *_, cond in recorder.calls)


@pytest.mark.parametrize("name", ["euler", "dpmpp_2m", "euler_ancestral", "ddim"])
def test_img2img_starts_part_way_down_the_schedule(name, tiny_eps_model, guidance_inputs, monkeypatch):
    sampler, recorder = SAMPLERS[name], Recorder(tiny_eps_model, monkeypatch)
    init = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(8))
    noise = guidance_inputs["x_T"]
    steps, strength = 10, 0.6
    k = sampler.denoise_steps(steps, strength)
    with torch.no_grad():
        sampler.sample(tiny_eps_model, request(guidance_inputs, steps=steps, noise=noise, init=init, denoise_steps=k,
                                               schedule=sampler.schedules[0]))
    assert len(recorder.calls) == sampler.unet_calls(k)
    first_x, first_t = recorder.calls[0][2][:2], recorder.calls[0][1][0].item()
    if name == "ddim":  # the original: noised to DDIM step t_enc, denoised from the step below it
        assert k == 6
        a = tiny_eps_model.alphas_cumprod
        grid = [1 + 100 * i for i in range(10)]
        expected = a[grid[k]].sqrt() * init + (1 - a[grid[k]]).sqrt() * noise
        assert first_t == grid[k - 1]
    else:  # the last k sigmas of the schedule, from init + sigma * noise
        assert k == 6
        levels = ModelSigmas(tiny_eps_model.alphas_cumprod)
        sigma = schedule_named(sampler.schedules[0]).sigmas(levels, steps)[steps - k]
        expected = (init + sigma * noise) / math.sqrt(1 + sigma**2)
        assert first_t == pytest.approx(levels.sigma_to_t(sigma), abs=1e-3)
    torch.testing.assert_close(first_x, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", [n for n in SAMPLERS if n not in ("ddim", "plms", "dpm")])
def test_k_samplers_read_nothing_from_the_device_in_their_loop(name, tiny_eps_model, guidance_inputs, monkeypatch):
    """Every way a tensor's value reaches Python (item, bool, float, int, tolist) fails during the run:
    on a GPU, none of them would be there to stall the loop."""
    sampler = SAMPLERS[name]
    r = request(guidance_inputs, noise=guidance_inputs["x_T"], schedule=sampler.schedules[0])

    def refuse(*args, **kwargs):
        raise AssertionError("a device value was read in the sampling loop")

    with torch.no_grad(), monkeypatch.context() as patch:
        for attribute in ("item", "__bool__", "__float__", "__int__", "tolist"):
            patch.setattr(torch.Tensor, attribute, refuse)
        out = sampler.sample(tiny_eps_model, r)
    assert torch.isfinite(out).all()
