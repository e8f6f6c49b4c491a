"""The k-diffusion samplers (ldm/models/diffusion/k_samplers.py) against independent implementations
on identical random weights, eps and v models, guidance 7.5 (one batched UNet call):

* diffusers' schedulers driving diffusers' own UNet (the tiny model's weights converted by its
  single-file converter), on the same sigmas: Euler, Heun, LMS (Karras sigmas, fractional
  timesteps); DPM2, DPM++ 2M, UniPC (bh1, bh2, orders 2 and 3) (trailing integer timesteps:
  diffusers rounds the UNet's timesteps of Karras sigmas in these schedulers, while it steps with
  the unrounded sigmas, which costs them 1e-4 against the exact run); and, fed the same noise, Euler a,
  DPM2 a, DPM++ 2M SDE (midpoint and heun), DPM++ SDE (its Brownian tree replaced by our draws),
  DDPM and LCM (its boundary condition c_skip made negligible by a huge ``timestep_scaling``).
  diffusers' latents are variance exploding for the sigma schedulers and variance preserving for
  the others; both sides start from the same point and end at sigma 0, where the forms agree.
* written here in the variance-preserving (alpha, sigma, lambda) form of the DPM-Solver++ paper,
  where diffusers has no equivalent: DPM++ 2S a, and DPM++ 3M SDE. diffusers' third-order
  sde-dpmsolver++ update is not one: its D2 coefficient ``(1 - e^-2h - 2h) / (2h)^2 - 0.5`` is the
  exact integral's, ``-((e^-2h - 1 + 2h) / (2h)^2 - 0.5)``, minus 1 (integrate
  ``2 e^(-2(h - u)) (u / h)^2 / 2`` over [0, h]); k-diffusion's (``-phi_3 * d2``) and ours are the
  integral's. With that one coefficient corrected, diffusers' update equals ours (tested too).

Tolerance: relative error (L2) of the final latents <= 1e-4: float32 schedules computed differently
(diffusers' cumulative product in float32, ours in float64), another UNet implementation, guidance
amplifying rounding; observed 1e-7 to 1e-6.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import rel_err
from ldm.models.diffusion import k_samplers as k
from ldm.models.diffusion.denoiser import Denoiser
from ldm.models.diffusion.sampling import GuidedModel
from ldm.models.diffusion.schedules import ModelSigmas, karras, trailing

SCALE, STEPS, SEED = 7.5, 12, 5


def scheduler(cls_name: str, parameterization: str, **options):
    import diffusers

    cls = getattr(diffusers, cls_name)
    return cls(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
               prediction_type="epsilon" if parameterization == "eps" else "v_prediction", **options)


def diffusers_run(sched, unet, x: torch.Tensor, inputs, generator=None) -> torch.Tensor:
    c, uc = inputs["c"], inputs["uc"]
    extra = {} if generator is None else {"generator": generator}
    for t in sched.timesteps:
        model_in = sched.scale_model_input(torch.cat([x, x]), t)
        out_uncond, out_cond = unet(model_in, t, encoder_hidden_states=torch.cat([uc, c])).sample.chunk(2)
        x = sched.step(out_uncond + SCALE * (out_cond - out_uncond), t, x, **extra).prev_sample
    return x


def our_denoiser(model, inputs) -> Denoiser:
    return Denoiser(GuidedModel(model, inputs["c"], inputs["uc"], SCALE))


def draws(shape, seed: int = SEED):
    """A noise sampler drawing from its own generator: fed the same seed, diffusers draws the same."""
    gen = torch.Generator().manual_seed(seed)
    return lambda sigma, sigma_next: torch.randn(shape, generator=gen)


def start(sigmas, x_T: torch.Tensor, variance_exploding: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(ours, diffusers') starting latents for the standard-normal draw ``x_T``."""
    ours = x_T * math.sqrt(1 + sigmas[0] ** 2)
    return ours, ours.clone() if variance_exploding else x_T.clone()


# (our function and options, diffusers scheduler and options, schedule, stochastic)
KARRAS = dict(use_karras_sigmas=True)
TRAILING = dict(timestep_spacing="trailing")
CASES = {
    "euler": (k.sample_euler, {}, "EulerDiscreteScheduler", KARRAS, "karras"),
    "heun": (k.sample_heun, {}, "HeunDiscreteScheduler", KARRAS, "karras"),
    "lms": (k.sample_lms, {}, "LMSDiscreteScheduler", KARRAS, "karras"),
    "dpm_2": (k.sample_dpm_2, {}, "KDPM2DiscreteScheduler", TRAILING, "trailing"),
    "dpmpp_2m": (k.sample_dpmpp_2m, {}, "DPMSolverMultistepScheduler",
                 dict(algorithm_type="dpmsolver++", solver_order=2, final_sigmas_type="zero", **TRAILING), "trailing"),
    "unipc_bh2_2": (k.sample_unipc, {}, "UniPCMultistepScheduler", dict(solver_type="bh2", solver_order=2, **TRAILING), "trailing"),
    "unipc_bh2_3": (k.sample_unipc, {"order": 3}, "UniPCMultistepScheduler", dict(solver_type="bh2", solver_order=3, **TRAILING), "trailing"),
    "unipc_bh1_2": (k.sample_unipc, {"variant": "bh1"}, "UniPCMultistepScheduler",
                    dict(solver_type="bh1", solver_order=2, final_sigmas_type="sigma_min", **TRAILING), "trailing"),
}
NOISY_CASES = {
    "euler_ancestral": (k.sample_euler_ancestral, {}, "EulerAncestralDiscreteScheduler", TRAILING, "trailing"),
    "dpm_2_ancestral": (k.sample_dpm_2_ancestral, {}, "KDPM2AncestralDiscreteScheduler", TRAILING, "trailing"),
    "dpmpp_2m_sde_midpoint": (k.sample_dpmpp_2m_sde, {}, "DPMSolverMultistepScheduler",
                              dict(algorithm_type="sde-dpmsolver++", solver_order=2, final_sigmas_type="zero", **TRAILING), "trailing"),
    "dpmpp_2m_sde_heun": (k.sample_dpmpp_2m_sde, {"solver_type": "heun"}, "DPMSolverMultistepScheduler",
                          dict(algorithm_type="sde-dpmsolver++", solver_order=2, solver_type="heun", final_sigmas_type="zero",
                               **TRAILING), "trailing"),
    "dpmpp_sde": (k.sample_dpmpp_sde, {}, "DPMSolverSDEScheduler", KARRAS, "karras"),
    "ddpm": (k.sample_ddpm, {}, "DDPMScheduler", dict(variance_type="fixed_small", clip_sample=False, **TRAILING), "trailing"),
    "lcm": (k.sample_lcm, {}, "LCMScheduler", dict(timestep_scaling=1e6, clip_sample=False), "trailing"),
}
VARIANCE_EXPLODING = {"EulerDiscreteScheduler", "HeunDiscreteScheduler", "LMSDiscreteScheduler", "KDPM2DiscreteScheduler",
                      "EulerAncestralDiscreteScheduler", "KDPM2AncestralDiscreteScheduler", "DPMSolverSDEScheduler"}
SCHEDULES = {"karras": karras, "trailing": trailing}


def compare(case, model, parameterization, diffusers_unet, inputs, noisy: bool) -> float:
    function, options, cls_name, diffusers_options, schedule = case
    levels = ModelSigmas(model.alphas_cumprod)
    sigmas = SCHEDULES[schedule](levels, STEPS)
    to_sigma_min = diffusers_options.get("final_sigmas_type") == "sigma_min"
    if to_sigma_min:  # diffusers' bh1 divides by zero on a last step to sigma 0: both end at the table's first level
        sigmas = [*sigmas[:-1], levels.sigma_min]
    sched = scheduler(cls_name, parameterization, **diffusers_options)
    if cls_name == "LCMScheduler":
        sched.set_timesteps(timesteps=[round(ModelSigmas(model.alphas_cumprod).sigma_to_t(s)) for s in sigmas[:-1]])
    else:
        sched.set_timesteps(STEPS)
    ours_x, theirs_x = start(sigmas, inputs["x_T"], cls_name in VARIANCE_EXPLODING)
    generator = None
    if noisy:
        options = {**options, "noise_sampler": draws(ours_x.shape)}
        generator = torch.Generator().manual_seed(SEED)
        if cls_name == "DPMSolverSDEScheduler":
            sched.noise_sampler = draws(ours_x.shape)
            generator = None
    with torch.no_grad():
        ours = function(our_denoiser(model, inputs), ours_x, sigmas, **options)
        ref = diffusers_run(sched, diffusers_unet, theirs_x, inputs, generator)
    if to_sigma_min and cls_name not in VARIANCE_EXPLODING:
        ours = ours / math.sqrt(1 + sigmas[-1] ** 2)  # the VP form of our last point
    assert rel_err(ours, inputs["x_T"]) > 0.1, "sampling did nothing"
    return rel_err(ours, ref)


@pytest.mark.parametrize("name", list(CASES))
def test_deterministic_samplers_equal_diffusers(name, model, parameterization, diffusers_unet, guidance_inputs):
    assert compare(CASES[name], model, parameterization, diffusers_unet, guidance_inputs, noisy=False) <= 1e-4


@pytest.mark.parametrize("name", list(NOISY_CASES))
def test_stochastic_samplers_equal_diffusers_fed_the_same_noise(name, model, parameterization, diffusers_unet, guidance_inputs):
    assert compare(NOISY_CASES[name], model, parameterization, diffusers_unet, guidance_inputs, noisy=True) <= 1e-4


# -- references written here, in the variance-preserving form ---------------------------------------
def vp(sigma: float) -> tuple[float, float, float]:
    """alpha_t, sigma_t and lambda_t of the VP form at VE noise level ``sigma``."""
    alpha = 1 / math.sqrt(1 + sigma**2)
    return alpha, sigma * alpha, math.log(1 / sigma)


def reference_dpmpp_2s_ancestral(data, x_T, sigmas, noise):
    """DPM-Solver++(2S) to sigma_down (Lu et al. 2022, Alg. 1 with r = 1/2), then fresh noise, in VP."""
    x = x_T * vp(sigmas[0])[0] * math.sqrt(1 + sigmas[0] ** 2)  # VP latents
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        a_s, sig_s, lam_s = vp(s)
        x0 = data(x, s)
        if s_next == 0:
            x = x0
            break
        up = min(s_next, math.sqrt(s_next**2 * (s**2 - s_next**2) / s**2))
        down = math.sqrt(s_next**2 - up**2)
        a_d, sig_d, lam_d = vp(down)
        lam_m = (lam_s + lam_d) / 2
        sig_m_ve = math.exp(-lam_m)
        a_m, sig_m, _ = vp(sig_m_ve)
        u = (sig_m / sig_s) * x - a_m * (math.exp(-(lam_m - lam_s)) - 1) * x0
        x0_mid = data(u, sig_m_ve)
        x_down = (sig_d / sig_s) * x - a_d * (math.exp(-(lam_d - lam_s)) - 1) * x0_mid
        # From VP at sigma_down to VP at sigma_next: the same VE point, plus noise of VE level ``up``.
        x = (x_down / a_d + up * noise()) * vp(s_next)[0]
    return x


def reference_dpmpp_3m_sde(data, x_T, sigmas, noise):
    """SDE-DPM-Solver++ (eta 1) of third order, multistep, in VP: x_t = (sigma_t / sigma_s) e^-h x_s
    + alpha_t (1 - e^-2h) D0 + alpha_t ((1 - e^-2h) / (2h) ... ) D1 + alpha_t c2 D2 + noise, where the
    coefficients integrate 2 e^(-2(h-u)) (D0 + (u/h) D1 + (u/h)^2 D2 / 2) exactly."""
    x = x_T  # VP latents at sigmas[0]
    history: list[tuple[float, torch.Tensor]] = []
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        _, sig_s, lam_s = vp(s)
        m = data(x, s)
        history = [*history, (lam_s, m)][-3:]
        if s_next == 0:
            x = m
            break
        a_t, sig_t, lam_t = vp(s_next)
        h = lam_t - lam_s
        H = 2 * h
        c1 = 1 + math.expm1(-H) / H  # the D1 integral
        c2 = 0.5 - (math.exp(-H) - 1 + H) / H**2  # the D2 integral (with the Taylor term's 1/2)
        x_new = (sig_t / sig_s) * math.exp(-h) * x - a_t * math.expm1(-H) * m
        if len(history) >= 2:
            (lam_1, m_1) = history[-2]
            r0 = (lam_s - lam_1) / h
            d1_0 = (m - m_1) / r0
            if len(history) == 3:
                (lam_2, m_2) = history[-3]
                r1 = (lam_1 - lam_2) / h
                d1_1 = (m_1 - m_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                x_new = x_new + a_t * c1 * d1 + a_t * c2 * d2
            else:
                x_new = x_new + a_t * c1 * d1_0
        x = x_new + sig_t * math.sqrt(-math.expm1(-2 * h)) * noise()
    return x


@pytest.mark.parametrize("name", ["dpmpp_2s_ancestral", "dpmpp_3m_sde"])
def test_samplers_diffusers_lacks_equal_the_published_update(name, model, guidance_inputs):
    denoiser = our_denoiser(model, guidance_inputs)
    sigmas = karras(ModelSigmas(model.alphas_cumprod), STEPS)
    x_T = guidance_inputs["x_T"]

    def data(x_vp: torch.Tensor, sigma: float) -> torch.Tensor:  # the model's x0 from VP latents
        return denoiser(x_vp * math.sqrt(1 + sigma**2), sigma)

    noise = draws(x_T.shape)
    with torch.no_grad():
        if name == "dpmpp_2s_ancestral":
            ours = k.sample_dpmpp_2s_ancestral(denoiser, x_T * math.sqrt(1 + sigmas[0] ** 2), sigmas, noise_sampler=draws(x_T.shape))
            ref = reference_dpmpp_2s_ancestral(data, x_T, sigmas, lambda: noise(0, 0))
        else:
            ours = k.sample_dpmpp_3m_sde(denoiser, x_T * math.sqrt(1 + sigmas[0] ** 2), sigmas, noise_sampler=draws(x_T.shape))
            ref = reference_dpmpp_3m_sde(data, x_T, sigmas, lambda: noise(0, 0))
    assert rel_err(ours, x_T) > 0.1
    assert rel_err(ours, ref) <= 1e-5


# -- the loop's contract ---------------------------------------------------------------------------
SECOND_ORDER = {"sample_heun", "sample_dpm_2", "sample_dpm_2_ancestral", "sample_dpmpp_2s_ancestral", "sample_dpmpp_sde"}
FUNCTIONS = sorted(name for name in dir(k) if name.startswith("sample_"))


class HostOnlyDenoiser:
    """A stand-in model that checks it is given Python floats and counts its calls."""

    def __init__(self):
        self.sigmas: list[float] = []

    def __call__(self, x: torch.Tensor, sigma) -> torch.Tensor:
        assert type(sigma) is float, type(sigma)
        self.sigmas.append(sigma)
        return x / (1 + sigma**2)  # the exact denoiser of standard-normal data


def test_every_function_is_covered():
    covered = {CASES[n][0].__name__ for n in CASES} | {NOISY_CASES[n][0].__name__ for n in NOISY_CASES}
    assert covered | {"sample_dpmpp_2s_ancestral", "sample_dpmpp_3m_sde"} == set(FUNCTIONS)


@pytest.mark.parametrize("name", FUNCTIONS)
@pytest.mark.parametrize("steps", [1, 2, 7])
def test_sigmas_stay_on_the_host_and_calls_are_one_or_two_per_step(name, steps, tiny_eps_model):
    sigmas = karras(ModelSigmas(tiny_eps_model.alphas_cumprod), steps)
    denoiser, seen = HostOnlyDenoiser(), []
    x = torch.randn(2, 4, 8, 8) * sigmas[0]
    out = getattr(k, name)(denoiser, x, sigmas, callback=lambda i, latents: seen.append((i, latents.shape)))
    per_step = 2 if name in SECOND_ORDER else 1
    assert len(denoiser.sigmas) == per_step * steps - (per_step - 1)  # the last step, to sigma 0, takes one
    assert seen == [(i, x.shape) for i in range(steps)]
    assert torch.isfinite(out).all()


def test_lms_coefficients_integrate_the_lagrange_basis():
    sigmas = [10.0, 6.0, 3.0, 1.5, 0.5]
    # One node: the whole interval; weights of several nodes sum to its length (they integrate 1).
    assert lms_close(k.lms_coefficients(sigmas, 0, 1), [sigmas[1] - sigmas[0]])
    for order in (2, 3, 4):
        w = k.lms_coefficients(sigmas, 3, order)
        assert math.isclose(sum(w), sigmas[4] - sigmas[3], rel_tol=1e-12)
    # Order 2: the trapezoid-like weights of the line through the last two nodes.
    h, h_last = sigmas[2] - sigmas[1], sigmas[1] - sigmas[0]
    assert lms_close(k.lms_coefficients(sigmas, 1, 2), [h + h * h / (2 * h_last), -h * h / (2 * h_last)])


def lms_close(a, b) -> bool:
    return np.allclose(a, b, rtol=1e-12, atol=0)


def test_ancestral_step_splits_the_variance():
    down, up = k.ancestral_step(5.0, 2.0)
    assert math.isclose(down**2 + up**2, 4.0) and 0 < up < 2.0
    assert k.ancestral_step(5.0, 2.0, eta=0.0) == (2.0, 0.0) and k.ancestral_step(5.0, 0.0) == (0.0, 0.0)


def test_dpmpp_3m_sde_equals_diffusers_with_its_d2_coefficient_corrected(model, parameterization, diffusers_unet,
                                                                           guidance_inputs, monkeypatch):
    """diffusers' third-order sde-dpmsolver++ with the one coefficient of the module docstring put right
    (``... - 0.5`` -> ``... + 0.5``) is ours; as released it is 12% away (eps, 12 steps)."""
    import inspect
    import textwrap

    from diffusers.schedulers import scheduling_dpmsolver_multistep as module

    method = module.DPMSolverMultistepScheduler.multistep_dpm_solver_third_order_update
    source = textwrap.dedent(inspect.getsource(method))
    fixed = source.replace("(2.0 * h) ** 2 - 0.5)) * D2", "(2.0 * h) ** 2 + 0.5)) * D2")
    if fixed == source:
        pytest.skip("this diffusers version words its third-order SDE update otherwise")
    namespace: dict = {}
    exec(fixed, module.__dict__, namespace)
    monkeypatch.setattr(module.DPMSolverMultistepScheduler, "multistep_dpm_solver_third_order_update",
                        namespace["multistep_dpm_solver_third_order_update"])
    case = (k.sample_dpmpp_3m_sde, {}, "DPMSolverMultistepScheduler",
            dict(algorithm_type="sde-dpmsolver++", solver_order=3, solver_type="heun", final_sigmas_type="zero",
                 lower_order_final=False, **TRAILING), "trailing")
    assert compare(case, model, parameterization, diffusers_unet, guidance_inputs, noisy=True) <= 1e-4
