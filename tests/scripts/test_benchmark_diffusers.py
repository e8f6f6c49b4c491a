"""scripts/benchmark_diffusers.py: the diffusers peer must do the same work as ours on the same
weights, or the benchmark compares unlike things. On the tiny model, its text encoder, UNet, VAE
and a whole PLMS generation from the same starting noise agree with ours in float32.

Tolerances: observed differences are about 1e-6 (the same float32 operations in other orders);
1e-4 absolute on outputs of order 1 leaves room for other BLAS builds while any wrong weight,
layer or schedule step gives differences of order 0.1.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from conftest import ROOT
from ldm.loading import load_model_from_config
from ldm.models.diffusion.plms import PLMSSampler

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

ATOL = 1e-4


def _load_peer():
    spec = importlib.util.spec_from_file_location("benchmark_diffusers", ROOT / "scripts" / "benchmark_diffusers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


peer = _load_peer()


@pytest.fixture(scope="module")
def both(tiny_files, tmp_path_factory):
    ours = load_model_from_config(tiny_files["config"], tiny_files["safetensors"])
    pipe = peer.build_pipeline(tiny_files["config"], tiny_files["safetensors"], tmp_path_factory.mktemp("tokenizer"))
    return ours, pipe


def test_tokenizer_matches_open_clip(both):
    ours, pipe = both
    prompts = ["A photo", "a professional photograph of an astronaut riding a triceratops", ""]
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(ids, ours.cond_stage_model.tokenize(prompts))


@torch.no_grad()
def test_components_match_ours(both):
    ours, pipe = both
    prompts = ["A photo", ""]
    context = ours.get_learned_conditioning(prompts)
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    torch.testing.assert_close(pipe.text_encoder(ids)[0], context, atol=ATOL, rtol=0)

    gen = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8, generator=gen), torch.tensor([10, 700])
    torch.testing.assert_close(pipe.unet(x, t, encoder_hidden_states=context).sample, ours.apply_model(x, t, context), atol=ATOL, rtol=0)

    z = torch.randn(1, 4, 8, 8, generator=gen)
    torch.testing.assert_close(pipe.vae.decode(z / pipe.vae.config.scaling_factor).sample, ours.decode_first_stage(z), atol=ATOL, rtol=0)


@torch.no_grad()
def test_generation_matches_plms(both):
    """Same starting noise, prompt, guidance and steps: the peer's image is ours."""
    ours, pipe = both
    x_T = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    sampler = PLMSSampler(ours, device="cpu")
    c, uc = ours.get_learned_conditioning(["A photo"]), ours.get_learned_conditioning([""])
    latents, _ = sampler.sample(S=5, conditioning=c, batch_size=1, shape=[4, 8, 8], verbose=False,
                                unconditional_guidance_scale=9.0, unconditional_conditioning=uc, eta=0.0, x_T=x_T.clone())
    expected = torch.clamp((ours.decode_first_stage(latents) + 1) / 2, 0, 1)
    image = pipe("A photo", height=64, width=64, num_inference_steps=5, guidance_scale=9.0, latents=x_T.clone(), output_type="pt").images
    assert expected.std() > 0.01  # not a degenerate image
    torch.testing.assert_close(image, expected, atol=ATOL, rtol=0)


@torch.no_grad()
@pytest.mark.slow
def test_compiled_peer_is_the_eager_peer(both):
    """diffusers_sdpa_compile: the peer's UNet compiled as ours (--compile on the CPU: frozen, ahead of
    time), called as its pipeline calls it, gives the eager pipeline's image."""
    import copy

    from ldm.generation.speed import compile_module

    _, pipe = both
    compiled = copy.deepcopy(pipe)
    compile_module(compiled.unet, "cpu")
    x_T = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    images = [p("A photo", height=64, width=64, num_inference_steps=2, guidance_scale=9.0, latents=x_T.clone(), output_type="pt").images
              for p in (pipe, compiled)]
    torch.testing.assert_close(images[1], images[0], atol=ATOL, rtol=0)


def test_refuses_native_mha_config(tiny_files, tmp_path):
    from conftest import tiny_config

    with pytest.raises(ValueError, match="original-layout"):
        peer.build_pipeline(tiny_config(native_mha=True), tiny_files["safetensors"], tmp_path)
