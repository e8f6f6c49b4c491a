"""DDIM against diffusers' DDIMScheduler configured as SD2's, driving diffusers' own UNet
(holding the same weights) with classifier-free guidance scale 9 for 10 steps.

Tolerance: relative error (L2) of the final latents <= 1e-4. The two runs differ only by
float32 rounding: diffusers builds the schedule in float32 (alphas_cumprod differ by up to
~1e-6 relative from the original's float64-then-float32 values), its UNet orders operations
differently (~1e-6), and guidance at scale 9 amplifies differences about tenfold per step
before DDIM's contraction. Observed: ~1e-6.
"""

from __future__ import annotations

import torch

from ldm.models.diffusion.ddim import DDIMSampler
from conftest import assert_draws_normals, rel_err, sd2_ddim_scheduler

SCALE, STEPS = 9.0, 10


def run_ours(model, inputs, steps=STEPS, eta=0.0, x_T=None):
    sampler = DDIMSampler(model, device="cpu")
    samples, intermediates = sampler.sample(
        steps, 2, (4, 8, 8), conditioning=inputs["c"], unconditional_conditioning=inputs["uc"],
        unconditional_guidance_scale=SCALE, eta=eta, x_T=inputs["x_T"].clone() if x_T is None else x_T, verbose=False,
    )
    return sampler, samples, intermediates


def test_ddim_matches_diffusers(parameterization, model, diffusers_unet, guidance_inputs):
    scheduler = sd2_ddim_scheduler(parameterization)
    scheduler.set_timesteps(STEPS)
    c, uc = guidance_inputs["c"], guidance_inputs["uc"]
    x = guidance_inputs["x_T"].clone()
    with torch.no_grad():
        for t in scheduler.timesteps:
            out_uncond, out_cond = diffusers_unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([uc, c])).sample.chunk(2)
            x = scheduler.step(out_uncond + SCALE * (out_cond - out_uncond), t, x, eta=0.0).prev_sample
        sampler, ours, _ = run_ours(model, guidance_inputs)
    assert sampler.ddim_timesteps[::-1].tolist() == scheduler.timesteps.tolist()
    assert not torch.allclose(ours, guidance_inputs["x_T"], atol=0.1), "sampling did nothing"
    assert rel_err(ours, x) <= 1e-4


def reference_ddim_eta(model, inputs, eta: float) -> torch.Tensor:
    """DDIM with noise (Song et al. eq. 12), written out; noise drawn as the original draws it."""
    ac = model.alphas_cumprod
    ts = list(range(1, 1000, 1000 // STEPS))[::-1]
    x, c, uc = inputs["x_T"].clone(), inputs["c"], inputs["uc"]
    for i, t in enumerate(ts):
        a = ac[t]
        a_prev = ac[ts[i + 1]] if i + 1 < len(ts) else ac[0]
        tt = torch.full((2,), t, dtype=torch.long)
        out_u, out_c = model.apply_model(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([uc, c])).chunk(2)
        out = out_u + SCALE * (out_c - out_u)
        if model.parameterization == "v":
            eps, x0 = a.sqrt() * out + (1 - a).sqrt() * x, a.sqrt() * x - (1 - a).sqrt() * out
        else:
            eps = out
            x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        sigma = eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)).sqrt()
        x = a_prev.sqrt() * x0 + (1 - a_prev - sigma**2).sqrt() * eps + sigma * torch.randn(x.shape)
    return x


def test_ddim_with_eta_matches_the_formula_and_noise_stream(model, guidance_inputs):
    with torch.no_grad():
        torch.manual_seed(7)
        _, ours, _ = run_ours(model, guidance_inputs, eta=0.8)
        torch.manual_seed(7)
        ref = reference_ddim_eta(model, guidance_inputs, eta=0.8)
    assert rel_err(ours, ref) <= 1e-5


def test_eta_0_still_draws_one_normal_per_step_as_the_original(tiny_eps_model, guidance_inputs):
    """Keeps the global random stream (and so later images of a seeded run) as the original's."""
    assert_draws_normals(lambda: run_ours(tiny_eps_model, guidance_inputs, steps=5), 5)


def test_x_T_is_drawn_when_not_given(tiny_eps_model, guidance_inputs):
    sampler = DDIMSampler(tiny_eps_model)
    with torch.no_grad():
        torch.manual_seed(11)
        a, _ = sampler.sample(2, 2, (4, 8, 8), conditioning=guidance_inputs["c"], verbose=False)
        torch.manual_seed(11)
        b, _ = sampler.sample(2, 2, (4, 8, 8), conditioning=guidance_inputs["c"], x_T=torch.randn(2, 4, 8, 8), verbose=False)
    assert torch.equal(a, b)


def test_intermediates_as_the_original(tiny_eps_model, guidance_inputs):
    with torch.no_grad():
        _, samples, intermediates = run_ours(tiny_eps_model, guidance_inputs)
    # x_T, then every log_every_t-th index (100: only index 0) and the first step.
    assert len(intermediates["x_inter"]) == len(intermediates["pred_x0"]) == 3
    assert torch.equal(intermediates["x_inter"][0], guidance_inputs["x_T"])
    assert torch.equal(intermediates["x_inter"][-1], samples)


def test_img2img_encode_and_decode(tiny_eps_model, guidance_inputs):
    """decode from the last step reproduces a full sampling run; stochastic_encode is q(x_t|x_0)
    on the DDIM grid."""
    with torch.no_grad():
        sampler, samples, _ = run_ours(tiny_eps_model, guidance_inputs)
        decoded = sampler.decode(
            guidance_inputs["x_T"].clone(), guidance_inputs["c"], STEPS, unconditional_guidance_scale=SCALE,
            unconditional_conditioning=guidance_inputs["uc"],
        )
        assert torch.equal(decoded, samples)
        x0, noise = samples, guidance_inputs["x_T"]
        t_enc = torch.tensor([6, 6])
        a = tiny_eps_model.alphas_cumprod[sampler.ddim_timesteps[6]]
        encoded = sampler.stochastic_encode(x0, t_enc, noise=noise)
    assert torch.allclose(encoded, a.sqrt() * x0 + (1 - a).sqrt() * noise, rtol=1e-6, atol=1e-6)
