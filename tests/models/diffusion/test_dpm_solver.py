"""DPM-Solver++ against the published update rule (Lu et al. 2022, multistep second order,
data prediction) implemented independently here as the original SD2 DPMSolverSampler ran it:
time-uniform steps from t = 1 to t = 1/N over the discrete schedule turned continuous by
piecewise-linear interpolation of log(alpha), the network fed (t - 1/N) * 1000, first order
on the first step and, below 15 steps, on the last; classifier-free guidance scale 9.

Tolerances: against the reference, relative error 1e-5 (it computes the schedule in float64,
ours in float32; observed <= ~1e-6). Against diffusers' DPMSolverMultistepScheduler, 1e-4
(float32 schedule, another UNet implementation; observed ~1e-6). diffusers feeds only integer
timesteps, so its grid equals the original's only when (N - 1) / steps is an integer:
9 steps (999, 888, ..., 111, then alphas_cumprod[0]); with 10 steps the original visits
fractional timesteps (899.1, 799.2, ...) that diffusers cannot, hence 9 there.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ldm.models.diffusion.dpm_solver import DiscreteVPSchedule, DPMSolverSampler, dpm_solver_plan
from conftest import rel_err

SCALE = 9.0


def reference_dpm_solver_pp(model, inputs, steps: int) -> torch.Tensor:
    n = model.num_timesteps
    grid_t = np.arange(1, n + 1) / n  # discrete step i sits at t = (i + 1) / N
    grid_log_alpha = 0.5 * np.log(model.alphas_cumprod.double().numpy())
    t = np.linspace(1.0, 1.0 / n, steps + 1)
    log_alpha = np.interp(t, grid_t, grid_log_alpha)  # within the grid: no extrapolation needed
    alpha, sigma = np.exp(log_alpha), np.sqrt(1.0 - np.exp(2.0 * log_alpha))
    lam = log_alpha - np.log(sigma)
    x, c, uc = inputs["x_T"].clone(), inputs["c"], inputs["uc"]

    def data_prediction(x: torch.Tensor, i: int) -> torch.Tensor:
        tt = torch.full((x.shape[0],), (t[i] - 1.0 / n) * 1000.0, dtype=torch.float32)
        out_c, out_u = model.apply_model(x, tt, c), model.apply_model(x, tt, uc)
        if model.parameterization == "v":  # the original converts each branch to noise
            out_c, out_u = alpha[i] * out_c + sigma[i] * x, alpha[i] * out_u + sigma[i] * x
        noise = out_u + SCALE * (out_c - out_u)
        return (x - sigma[i] * noise) / alpha[i]

    preds = [data_prediction(x, 0)]
    for i in range(1, steps + 1):
        h = lam[i] - lam[i - 1]
        first_order = i == 1 or (i == steps and steps < 15)
        x = (sigma[i] / sigma[i - 1]) * x - (alpha[i] * np.expm1(-h)) * preds[-1]
        if not first_order:
            r = (lam[i - 1] - lam[i - 2]) / h
            x = x - 0.5 * (alpha[i] * np.expm1(-h)) * ((preds[-1] - preds[-2]) / r)
        if i < steps:
            preds.append(data_prediction(x, i))
    return x


def run_ours(model, inputs, steps: int):
    return DPMSolverSampler(model, device="cpu").sample(
        steps, 2, (4, 8, 8), conditioning=inputs["c"], unconditional_conditioning=inputs["uc"],
        unconditional_guidance_scale=SCALE, x_T=inputs["x_T"].clone(), verbose=False,
    )


# 16 steps: at 15 or more the last step stays second order.
@pytest.mark.parametrize("parameterization, steps", [("eps", 10), ("v", 10), ("eps", 16)])
def test_dpm_solver_matches_the_published_rule(model, guidance_inputs, steps):
    with torch.no_grad():
        ours, intermediates = run_ours(model, guidance_inputs, steps)
        ref = reference_dpm_solver_pp(model, guidance_inputs, steps)
    assert intermediates is None
    assert not torch.allclose(ours, guidance_inputs["x_T"], atol=0.1)
    assert rel_err(ours, ref) <= 1e-5


def test_dpm_solver_matches_diffusers_on_a_shared_grid(parameterization, model, diffusers_unet, guidance_inputs):
    from diffusers import DPMSolverMultistepScheduler

    steps = 9
    scheduler = DPMSolverMultistepScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        algorithm_type="dpmsolver++", solver_order=2, lower_order_final=True, final_sigmas_type="sigma_min",
        prediction_type="epsilon" if parameterization == "eps" else "v_prediction",
    )
    scheduler.set_timesteps(timesteps=[999 - 111 * i for i in range(steps)])
    plan = dpm_solver_plan(DiscreteVPSchedule(model.alphas_cumprod), steps)
    assert torch.allclose(plan["model_time"][:-1], scheduler.timesteps.float(), atol=1e-3)
    c, uc = guidance_inputs["c"], guidance_inputs["uc"]
    x = guidance_inputs["x_T"].clone()
    with torch.no_grad():
        for t in scheduler.timesteps:
            out_uncond, out_cond = diffusers_unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([uc, c])).sample.chunk(2)
            x = scheduler.step(out_uncond + SCALE * (out_cond - out_uncond), t, x).prev_sample
        ours, _ = run_ours(model, guidance_inputs, steps)
    assert rel_err(ours, x) <= 1e-4


def test_plan_grid_and_orders(tiny_eps_model):
    schedule = DiscreteVPSchedule(tiny_eps_model.alphas_cumprod)
    plan = dpm_solver_plan(schedule, 10)
    assert plan["model_time"][0] == 999.0 and abs(plan["model_time"][-1].item()) < 1e-3
    assert torch.allclose(plan["model_time"], torch.linspace(999.0, 0.0, 11), atol=1e-3)
    # inv_r == 0 marks first-order steps: the first and (below 15 steps) the last.
    assert plan["inv_r"][1] == 0 and plan["inv_r"][10] == 0 and (plan["inv_r"][2:10] > 0).all()
    assert dpm_solver_plan(schedule, 15)["inv_r"][15] > 0
    # At the grid points the interpolated schedule is the discrete one.
    t = torch.tensor([0.001, 0.5, 1.0])
    expected = 0.5 * torch.log(tiny_eps_model.alphas_cumprod[[0, 499, 999]])
    assert torch.allclose(schedule.marginal_log_mean_coeff(t), expected, atol=1e-6)


def test_dpm_solver_draws_no_noise_when_x_T_is_given(tiny_eps_model, guidance_inputs):
    with torch.no_grad():
        torch.manual_seed(2)
        run_ours(tiny_eps_model, guidance_inputs, 3)
        after = torch.randn(1)
    torch.manual_seed(2)
    assert torch.equal(after, torch.randn(1))


def test_too_few_steps_for_order_2(tiny_eps_model, guidance_inputs):
    with pytest.raises(ValueError, match="at least 2"):
        run_ours(tiny_eps_model, guidance_inputs, 1)
