"""The sigma schedules (ldm/models/diffusion/schedules.py): against diffusers where it has them
(uniform = its "leading" spacing with steps_offset 1, trailing, karras, exponential), else against
their published definitions written here (normal: k-diffusion's get_sigmas; simple and beta:
ComfyUI's; turbo: generative-models' SD-Turbo subset). Tolerance: 1e-5 relative against diffusers
(its tables are float32), 1e-12 against the definitions (both float64)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import beta as beta_distribution

from ldm.models.diffusion.sampling import make_ddim_timesteps
from ldm.models.diffusion.schedules import SCHEDULES, ModelSigmas, schedule_named


@pytest.fixture(scope="module")
def levels(tiny_eps_model) -> ModelSigmas:
    return ModelSigmas(tiny_eps_model.alphas_cumprod)


def euler(**options):
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                  beta_schedule="scaled_linear", **options)


def diffusers_sigmas(steps: int, **options) -> np.ndarray:
    scheduler = euler(**options)
    scheduler.set_timesteps(steps)
    return scheduler.sigmas.double().numpy()


@pytest.mark.parametrize("steps", [1, 4, 10, 25, 50])
@pytest.mark.parametrize("name, options", [
    ("uniform", dict(timestep_spacing="leading", steps_offset=1)),
    ("trailing", dict(timestep_spacing="trailing")),
    ("karras", dict(use_karras_sigmas=True)),
    ("exponential", dict(use_exponential_sigmas=True)),
])  # fmt: skip
def test_schedules_diffusers_has(levels, name, options, steps):
    ours = np.array(SCHEDULES[name].sigmas(levels, steps))
    if name in ("karras", "exponential") and steps == 1:
        pytest.skip("diffusers' one-step linspace grid is timestep 0 alone: its Karras and exponential sigmas start at sigma_min")
    np.testing.assert_allclose(ours, diffusers_sigmas(steps, **options), rtol=1e-5, atol=0)


def test_uniform_visits_the_ddim_grid(levels):
    ours = SCHEDULES["uniform"].sigmas(levels, 30)
    timesteps = make_ddim_timesteps("uniform", 30, 1000)[::-1]
    assert len(ours) == 32 and SCHEDULES["uniform"].check(30, 1000) == 31  # the original's grid holds 31
    np.testing.assert_allclose(ours[:-1], levels.sigmas[timesteps], rtol=1e-12)
    assert [round(levels.sigma_to_t(s)) for s in ours[:3]] == [991, 958, 925]


def test_normal_simple_beta_and_turbo_follow_their_definitions(levels):
    table = levels.sigmas
    # normal: timesteps linspace(999, 0, n), sigma interpolated in log sigma (k-diffusion's get_sigmas)
    t = np.linspace(999, 0, 7)
    low = np.floor(t).astype(int)
    w = t - low
    expected = np.exp((1 - w) * np.log(table[low]) + w * np.log(table[np.minimum(low + 1, 999)]))
    np.testing.assert_allclose(SCHEDULES["normal"].sigmas(levels, 7)[:-1], expected, rtol=1e-12)
    # simple: every (1000 / n)-th table entry from the top
    np.testing.assert_allclose(SCHEDULES["simple"].sigmas(levels, 3)[:-1], table[[999, 666, 333]], rtol=1e-12)
    # beta: timesteps rint(ppf(1 - linspace(0, 1, n, endpoint=False); 0.6, 0.6) * 999), repeats dropped
    steps = 9
    ts = np.rint(beta_distribution.ppf(1 - np.linspace(0, 1, steps, endpoint=False), 0.6, 0.6) * 999).astype(int)
    np.testing.assert_allclose(SCHEDULES["beta"].sigmas(levels, steps)[:-1], table[ts], rtol=1e-12)
    assert ts[0] == 999 and SCHEDULES["beta"].check(steps, 1000) == steps
    # turbo: generative-models' SD-Turbo subset
    np.testing.assert_allclose(SCHEDULES["turbo"].sigmas(levels, 4)[:-1], table[[999, 899, 799, 699]], rtol=1e-12)
    for name in SCHEDULES:
        sigmas = SCHEDULES[name].sigmas(levels, 4)
        assert sigmas[-1] == 0.0 and all(a > b for a, b in zip(sigmas, sigmas[1:])), name
        assert all(type(s) is float for s in sigmas), name


def test_beta_drops_repeated_timesteps():
    n = SCHEDULES["beta"].check(400, 1000)
    assert n < 400 and len(SCHEDULES["beta"].sigmas(ModelSigmas(np.linspace(0.999, 0.01, 1000)), 400)) == n + 1


@pytest.mark.parametrize("name, steps, message", [
    ("turbo", 5, "the turbo schedule takes 1 to 4 steps, got 5"),
    ("karras", 0, "takes 1 to 1000 steps"),
    ("uniform", 3, "nearest step counts that fit are"),
])  # fmt: skip
def test_impossible_step_counts_are_refused(name, steps, message):
    with pytest.raises(ValueError, match=message):
        SCHEDULES[name].check(steps, 1000)


def test_names_and_aliases():
    assert schedule_named("SGM Uniform").name == schedule_named("sgm_uniform").name == "trailing"
    assert schedule_named("Karras").name == "karras" and schedule_named("leading").name == "uniform"
    with pytest.raises(ValueError, match="unknown schedule 'polyexponential'; choose one of uniform, karras"):
        schedule_named("polyexponential")


def test_sigma_and_timestep_maps_are_inverse_and_exact_on_the_table(levels):
    for t in (0, 1, 499, 998, 999):
        assert levels.sigma_to_t(float(levels.sigmas[t])) == pytest.approx(t, abs=1e-9)
    for t in (0.25, 123.5, 998.75):
        assert levels.sigma_to_t(float(levels.t_to_sigma(t))) == pytest.approx(t, abs=1e-9)
    assert levels.sigma_to_t(100.0) == 999.0 and levels.sigma_to_t(1e-4) == 0.0  # clamped to the table
