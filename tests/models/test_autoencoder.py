"""The KL autoencoder against diffusers' AutoencoderKL holding the same (random) weights.

Both the encoder (posterior mean and log-variance) and the decoder are compared, through
the mid-block attention that every SD VAE has (SD2's config has no other attention, and
diffusers' down/up blocks support none). Tolerance: relative error 1e-4, float32 rounding
through ~30 layers (observed ~1e-6). The same for the other families' autoencoders: the x4
upscaler's (f=4, three levels, scale factor 0.08333) and unCLIP's, whose config names
``attn_type: "vanilla-xformers"`` and must run without xFormers.
"""

from __future__ import annotations

import pytest
import torch

from conftest import diffusers_vae_twin, rel_err, tiny_config, tiny_unclip_config, tiny_x4_config

RTOL = 1e-4


@pytest.fixture(scope="module")
def diffusers_vae(tiny_eps_model):
    return diffusers_vae_twin(tiny_config(), tiny_eps_model)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(5)) * 2 - 1


def test_mid_block_attention_is_exercised(tiny_eps_model):
    vae = tiny_eps_model.first_stage_model
    for attn in (vae.encoder.mid.attn_1, vae.decoder.mid.attn_1):
        assert attn.proj_out.weight.abs().sum() > 0


def test_encoder_posterior_matches_diffusers(tiny_eps_model, diffusers_vae, images):
    with torch.no_grad():
        ours = tiny_eps_model.encode_first_stage(images)
        ref = diffusers_vae.encode(images).latent_dist
    assert ours.mean.shape == ref.mean.shape == (2, 4, 8, 8)
    assert rel_err(ours.mean, ref.mean) <= RTOL
    assert rel_err(ours.logvar, ref.logvar) <= RTOL
    assert rel_err(ours.std, ref.std) <= RTOL


def test_decoder_matches_diffusers(tiny_eps_model, diffusers_vae):
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ours = tiny_eps_model.first_stage_model.decode(z)
        ref = diffusers_vae.decode(z).sample
    assert ours.shape == ref.shape == (2, 3, 64, 64)
    assert rel_err(ours, ref) <= RTOL


def test_scale_factor_round_trip_matches_diffusers(tiny_eps_model, diffusers_vae, images):
    """LatentDiffusion scales latents by scale_factor (0.18215) both ways, as diffusers'
    pipelines do with the VAE's scaling_factor."""
    model = tiny_eps_model
    assert diffusers_vae.config.scaling_factor == model.scale_factor
    with torch.no_grad():
        posterior = model.encode_first_stage(images)
        z = model.get_first_stage_encoding(posterior.mode())
        ref_z = diffusers_vae.encode(images).latent_dist.mode() * diffusers_vae.config.scaling_factor
        assert rel_err(z, ref_z) <= RTOL
        ours = model.decode_first_stage(z)
        ref = diffusers_vae.decode(ref_z / diffusers_vae.config.scaling_factor).sample
    assert rel_err(ours, ref) <= RTOL


def test_decode_first_stage_divides_as_the_original(tiny_eps_model):
    """The original computes ``1. / scale_factor * z``; the same rounding gives the same image."""
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected = tiny_eps_model.first_stage_model.decode(1.0 / tiny_eps_model.scale_factor * z)
        assert torch.equal(tiny_eps_model.decode_first_stage(z), expected)  # the same operations: bit for bit


@pytest.fixture(scope="module", params=["x4", "unclip"])
def family_vae(request, tiny_x4_model, tiny_unclip_models):
    """(tiny model of the family, diffusers' twin of its autoencoder, latent size factor)."""
    if request.param == "x4":
        return tiny_x4_model, diffusers_vae_twin(tiny_x4_config(), tiny_x4_model, 0.08333), 4
    model = tiny_unclip_models["h"]
    return model, diffusers_vae_twin(tiny_unclip_config("h"), model, 0.18215), 8


def test_family_autoencoders_match_diffusers(family_vae, images):
    model, vae, factor = family_vae
    assert model.first_stage_model.downsampling_factor == factor
    with torch.no_grad():
        ours = model.encode_first_stage(images)
        ref = vae.encode(images).latent_dist
        z = ours.mean
        decoded = model.decode_first_stage(z)
        ref_decoded = vae.decode(z / vae.config.scaling_factor).sample
    assert ours.mean.shape == (2, 4, 64 // factor, 64 // factor)
    assert rel_err(ours.mean, ref.mean) <= RTOL and rel_err(ours.logvar, ref.logvar) <= RTOL
    assert decoded.shape == images.shape
    assert rel_err(decoded, ref_decoded) <= RTOL


def test_vanilla_xformers_attention_runs_without_xformers(tiny_unclip_models):
    import importlib.util

    ddconfig = tiny_unclip_config("h").model.params.first_stage_config.params.ddconfig
    assert ddconfig.attn_type == "vanilla-xformers"
    if importlib.util.find_spec("xformers") is None:  # this environment: the config still runs
        z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(7))
        with torch.no_grad():
            assert torch.isfinite(tiny_unclip_models["h"].decode_first_stage(z)).all()
