"""LatentDiffusion's schedule and parameterization helpers, against the original's formulas
written out independently here."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import randomize_, tiny_config
from ldm.loading import build_model
from ldm.models.diffusion.ddpm import LatentDiffusion


def original_schedule(timesteps: int = 1000, start: float = 0.00085, end: float = 0.012) -> dict[str, np.ndarray]:
    """The original register_schedule: betas linear in sqrt(beta), float64 numpy, v_posterior 0."""
    betas = (torch.linspace(start**0.5, end**0.5, timesteps, dtype=torch.float64) ** 2).numpy()
    alphas = 1.0 - betas
    ac = np.cumprod(alphas, axis=0)
    ac_prev = np.append(1.0, ac[:-1])
    post_var = (1 - 0.0) * betas * (1.0 - ac_prev) / (1.0 - ac) + 0.0 * betas
    return {
        "betas": betas,
        "alphas_cumprod": ac,
        "alphas_cumprod_prev": ac_prev,
        "sqrt_alphas_cumprod": np.sqrt(ac),
        "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - ac),
        "log_one_minus_alphas_cumprod": np.log(1.0 - ac),
        "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / ac),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / ac - 1),
        "posterior_variance": post_var,
        "posterior_log_variance_clipped": np.log(np.maximum(post_var, 1e-20)),
        "posterior_mean_coef1": betas * np.sqrt(ac_prev) / (1.0 - ac),
        "posterior_mean_coef2": (1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac),
    }


def test_schedule_buffers_equal_the_original_exactly(tiny_eps_model):
    # Bit for bit: both sides call the same float64 NumPy/PyTorch functions in the same order.
    expected = original_schedule()
    for name, value in expected.items():
        buf = getattr(tiny_eps_model, name)
        assert buf.dtype == torch.float32 and buf.shape == (1000,)
        assert torch.equal(buf, torch.tensor(value, dtype=torch.float32)), name


def test_schedule_agrees_with_diffusers_scaled_linear(tiny_eps_model):
    """diffusers computes the same schedule in float32: equal to float32 rounding."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    assert torch.allclose(sched.betas, tiny_eps_model.betas, rtol=1e-5, atol=0)
    assert torch.allclose(sched.alphas_cumprod, tiny_eps_model.alphas_cumprod, rtol=1e-5, atol=0)


def test_schedule_is_real_on_a_meta_model():
    model = build_model(tiny_config(), "meta")
    assert not model.alphas_cumprod.is_meta
    assert torch.equal(model.alphas_cumprod, torch.tensor(original_schedule()["alphas_cumprod"], dtype=torch.float32))


def test_parameterization_helpers_are_consistent(tiny_v_model):
    model = tiny_v_model
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 4, 8, 8, generator=gen)
    noise = torch.randn(3, 4, 8, 8, generator=gen)
    t = torch.tensor([1, 500, 999])
    x_t = model.q_sample(x0, t, noise)
    a = model.alphas_cumprod.double()[t].view(-1, 1, 1, 1)
    assert torch.allclose(x_t.double(), a.sqrt() * x0 + (1 - a).sqrt() * noise, atol=1e-6)
    v = model.get_v(x0, noise, t)
    assert torch.allclose(v.double(), a.sqrt() * noise - (1 - a).sqrt() * x0, atol=1e-6)
    assert torch.allclose(model.predict_start_from_z_and_v(x_t, t, v), x0, atol=1e-5)
    assert torch.allclose(model.predict_eps_from_z_and_v(x_t, t, v), noise, atol=1e-5)
    assert torch.allclose(model.predict_start_from_noise(x_t, t, noise), x0, atol=1e-3)


def test_apply_model_routes_conditioning(tiny_eps_model):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=gen)
    t = torch.tensor([10])
    c = torch.randn(1, 77, 48, generator=gen)
    with torch.no_grad():
        direct = tiny_eps_model.model.diffusion_model(x, t, context=c)
        assert torch.equal(tiny_eps_model.apply_model(x, t, c), direct)
        assert torch.equal(tiny_eps_model.apply_model(x, t, [c]), direct)
        assert torch.equal(tiny_eps_model.apply_model(x, t, {"c_crossattn": [c]}), direct)


def test_adm_conditioning_keys_route_c_adm_to_the_unet_labels(tiny_x4_model, tiny_unclip_models, tiny_eps_model):
    """hybrid-adm (x4): c_concat joins the input, c_adm is y; crossattn-adm (unCLIP): c_adm is y."""
    gen = torch.Generator().manual_seed(0)
    x, low, t = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 3, 8, 8, generator=gen), torch.tensor([10, 900])
    c, levels, adm = torch.randn(2, 77, 48, generator=gen), torch.tensor([0, 350]), torch.randn(2, 64, generator=gen)
    x4, unclip = tiny_x4_model, tiny_unclip_models["h"]
    with torch.no_grad():
        assert torch.equal(
            x4.apply_model(x, t, {"c_concat": [low], "c_crossattn": [c], "c_adm": levels}),
            x4.model.diffusion_model(torch.cat([x, low], 1), t, context=c, y=levels),
        )
        assert torch.equal(
            unclip.apply_model(x, t, {"c_crossattn": [c], "c_adm": adm}),
            unclip.model.diffusion_model(x, t, context=c, y=adm),
        )
        with pytest.raises(ValueError, match="'crossattn-adm'.*needs 'c_adm'"):
            unclip.apply_model(x, t, c)
        with pytest.raises(ValueError, match="'crossattn'.*must not hold 'c_adm'"):
            tiny_eps_model.apply_model(x, t, {"c_crossattn": [c], "c_adm": adm})


def test_unknown_options_and_parameterizations_are_refused():
    config = tiny_config()
    config.model.params.no_such_option = 1
    with pytest.raises(TypeError, match="no_such_option"):
        build_model(config, "meta")
    with pytest.raises(ValueError, match="parameterization"):
        build_model(tiny_config("x0"), "meta")


def test_ema_scope_is_a_no_op_without_ema(tiny_eps_model):
    before = {k: v.clone() for k, v in tiny_eps_model.model.state_dict().items()}
    with tiny_eps_model.ema_scope("sampling"):
        pass
    assert all(torch.equal(v, before[k]) for k, v in tiny_eps_model.model.state_dict().items())


def test_ema_scope_swaps_in_and_restores_the_averages():
    config = tiny_config()
    config.model.params.use_ema = True
    model = randomize_(build_model(config, "cpu"), seed=4)
    ema_keys = [k for k in model.state_dict() if k.startswith("model_ema.")]
    assert "model_ema.decay" in ema_keys and "model_ema.num_updates" in ema_keys
    assert "model_ema.diffusion_modelout2weight" in ema_keys  # the original's dot-free names
    weight = model.model.diffusion_model.out[2].weight
    trained = weight.detach().clone()
    shadow = model.model_ema.diffusion_modelout2weight
    shadow.copy_(trained + 1.0)
    with model.ema_scope():
        assert torch.equal(weight, trained + 1.0)
    assert torch.equal(weight, trained)
    # One update with num_updates 0 -> 1 uses decay min(0.9999, 2/11).
    model.model_ema(model.model)
    decay = 2 / 11
    assert torch.allclose(shadow, trained + decay * 1.0, atol=1e-6)


def test_latent_diffusion_is_importable_from_the_original_path():
    assert LatentDiffusion.__module__ == "ldm.models.diffusion.ddpm"


def test_scale_by_std_keeps_the_scale_as_a_checkpoint_buffer(tiny_eps_model):
    """As the original: with scale_by_std the (data-estimated) scale is a buffer, so
    checkpoints of such configs carry a ``scale_factor`` key and load strictly."""
    config = tiny_config()
    config.model.params.scale_by_std = True
    model = build_model(config, "cpu").eval()
    assert "scale_factor" in model.state_dict()
    state = {**tiny_eps_model.state_dict(), "scale_factor": torch.tensor(0.5)}
    model.load_state_dict(state, strict=True)
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model.get_first_stage_encoding(z), 0.5 * z)
        assert torch.equal(model.decode_first_stage(z), tiny_eps_model.first_stage_model.decode(2.0 * z))
