"""Textual inversion against diffusers: ``StableDiffusionPipeline.load_textual_inversion`` on the
tiny model's weights (text tower in transformers' CLIPTextModel, diffusers' SD2 layout; the tiny
UNet and VAE converted by diffusers' single-file converters) and the same random embedding file,
in each format both read: A1111's ``.pt``, kohya's ``emb_params`` safetensors, a bare tensor and
diffusers' own ``learned_embeds``; one and several vectors, the name once or twice in a prompt.

The prompt embeddings (``pipe.encode_prompt``) equal this project's conditioning to 1e-6 relative
(float32 rounding of two implementations; observed 0: equal bit for bit on this CPU). diffusers pads with "!" (id 0) as SD2's tokenizer does, which makes
"!" a special token there: the prompts hold none.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from conftest import diffusers_vae_twin, rel_err, sd2_ddim_scheduler, tiny_config, transformers_text_twin, transformers_tokenizer
from ldm.modules.encoders.embeddings import load_embedding
from ldm.modules.encoders.prompts import PromptEncoder

RTOL = 1e-6


@pytest.fixture(scope="module")
def vae(tiny_eps_model):
    return diffusers_vae_twin(tiny_config(), tiny_eps_model)


def diffusers_pipeline(model, unet, vae):
    """A fresh StableDiffusionPipeline on the tiny weights: load_textual_inversion changes its tokenizer."""
    from diffusers import StableDiffusionPipeline

    embedder = model.cond_stage_model
    text_encoder = transformers_text_twin(embedder, layers=len(embedder.model.transformer.resblocks) - 1)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=transformers_tokenizer(embedder), unet=unet,
                                   scheduler=sd2_ddim_scheduler("eps"), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def save(path, kind: str, vectors: torch.Tensor):
    if kind == "a1111":
        torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": torch.nn.Parameter(vectors.clone())},
                    "name": path.stem, "step": 500, "sd_checkpoint": None, "sd_checkpoint_name": None}, path)
    elif kind == "kohya":
        save_file({"emb_params": vectors.contiguous()}, path)
    elif kind == "diffusers":
        torch.save({path.stem: vectors}, path)
    else:
        torch.save(vectors, path)
    return path


SUFFIX = {"a1111": ".pt", "kohya": ".safetensors", "diffusers": ".bin", "tensor": ".pt"}
PROMPTS = ["a photo of mystyle", "a mystyle house by a lake, in the style of mystyle"]


@pytest.mark.parametrize("kind", list(SUFFIX))
@pytest.mark.parametrize("n", [1, 4])
def test_prompt_embeddings_equal_diffusers_load_textual_inversion(tiny_eps_model, diffusers_unet, vae, tmp_path, kind, n):
    vectors = torch.randn(n, 48, generator=torch.Generator().manual_seed(n)) * 0.5
    path = save(tmp_path / f"mystyle{SUFFIX[kind]}", kind, vectors)
    pipe = diffusers_pipeline(tiny_eps_model, diffusers_unet, vae)
    pipe.load_textual_inversion(str(path), token="mystyle")
    encoder = PromptEncoder(tiny_eps_model.cond_stage_model, [load_embedding(path, 48)])
    with torch.no_grad():
        for prompt in PROMPTS:
            expected = pipe.encode_prompt(prompt, "cpu", 1, False)[0]
            ours = encoder.encode([prompt])
            assert ours.shape == expected.shape == (1, 77, 48)
            assert rel_err(ours, expected) <= RTOL, prompt
            plain = PromptEncoder(tiny_eps_model.cond_stage_model).encode([prompt])
            assert rel_err(plain, expected) > 1e-3  # the embedding matters


def test_two_embeddings_at_once(tiny_eps_model, diffusers_unet, vae, tmp_path):
    """Names as the concepts library has them (``<cat-toy>``: several tokens each, to this tokenizer)."""
    paths = [save(tmp_path / "<cat-toy>.pt", "a1111", torch.randn(2, 48)), save(tmp_path / "mystyle.safetensors", "kohya", torch.randn(3, 48))]
    pipe = diffusers_pipeline(tiny_eps_model, diffusers_unet, vae)
    pipe.load_textual_inversion([str(p) for p in paths], token=["<cat-toy>", "mystyle"])
    encoder = PromptEncoder(tiny_eps_model.cond_stage_model, [load_embedding(p, 48) for p in paths])
    prompt = "mystyle, a castle of <cat-toy> in mystyle light"
    with torch.no_grad():
        assert rel_err(encoder.encode([prompt]), pipe.encode_prompt(prompt, "cpu", 1, False)[0]) <= RTOL
