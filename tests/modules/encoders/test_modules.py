"""The OpenCLIP text encoder against transformers' CLIPTextModel holding the same weights
(converted by diffusers' ``convert_open_clip_checkpoint``), and its tokenizer against
transformers' CLIPTokenizer built from the same BPE vocabulary.

SD2 conditions on the penultimate layer's output passed through the final layer norm
(``layer: "penultimate"``); ``"last"`` is the usual last hidden state. Tolerance: relative
error 1e-4 (float32 rounding; the two implementations happen to agree to the bit here).
"""

from __future__ import annotations

import pytest
import torch

from conftest import FIXTURES, rel_err
from ldm.modules.encoders.modules import FrozenOpenCLIPEmbedder

RTOL = 1e-4
TINY_ARCH = f"local-dir:{FIXTURES / 'tiny-clip'}"
PROMPTS = [
    "a professional photograph of an astronaut riding a horse",
    "",
    "Déjà vu!!  two   spaces, UPPER case, punctuation... & émojis 🤖 it's 3.14",
    "word " * 100,  # longer than the context: truncated, end token kept
]


@pytest.fixture(scope="module")
def hf_text_model(tiny_eps_model):
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel

    text = tiny_eps_model.cond_stage_model.model
    width = text.token_embedding.weight.shape[1]
    config = CLIPTextConfig(
        vocab_size=text.token_embedding.weight.shape[0],
        hidden_size=width,
        intermediate_size=4 * width,
        num_hidden_layers=len(text.transformer.resblocks),
        num_attention_heads=text.transformer.resblocks[0].attn.num_heads,
        max_position_embeddings=text.positional_embedding.shape[0],
        hidden_act="gelu",
        layer_norm_eps=1e-5,
    )
    model = CLIPTextModel(config).eval()
    converted = convert_open_clip_checkpoint(model, tiny_eps_model.state_dict())
    # The text projection is not part of CLIPTextModel, nor used by SD.
    converted = {k: v for k, v in converted.items() if k != "text_projection.weight"}
    # transformers >= 5 dropped the ``text_model.`` level of CLIPTextModel's keys.
    own = model.state_dict().keys()
    converted = {k if k in own else k.removeprefix("text_model."): v for k, v in converted.items()}
    model.load_state_dict(converted, strict=True)
    return model


@pytest.fixture(scope="module")
def hf_tokenizer(tiny_eps_model):
    from transformers import CLIPTokenizer

    bpe = tiny_eps_model.cond_stage_model.tokenizer
    merges = [pair for pair, _ in sorted(bpe.bpe_ranks.items(), key=lambda item: item[1])]
    start, end = bpe.decoder[bpe.sot_token_id], bpe.decoder[bpe.eot_token_id]
    return CLIPTokenizer(vocab=dict(bpe.encoder), merges=merges, bos_token=start, eos_token=end, unk_token=end, pad_token=end)


def reference_ids(tokenizer, prompts, length: int = 77) -> torch.Tensor:
    """transformers' ids, padded with 0 as open_clip (and SD2's tokenizer, pad token "!") pads."""
    ids = tokenizer(prompts, truncation=True, max_length=length).input_ids
    return torch.tensor([row + [0] * (length - len(row)) for row in ids])


def test_tokenization_matches_transformers(tiny_eps_model, hf_tokenizer):
    ours = tiny_eps_model.cond_stage_model.tokenize(PROMPTS)
    ref = reference_ids(hf_tokenizer, PROMPTS)
    assert ours.shape == (len(PROMPTS), 77) and ours.dtype == torch.long
    assert torch.equal(ours, ref)
    assert ours[3, -1] == hf_tokenizer.eos_token_id


def test_too_long_prompt_warns(tiny_eps_model, caplog):
    with caplog.at_level("WARNING"):
        tiny_eps_model.cond_stage_model.tokenize(["word " * 100])
    assert any("100 tokens" in r.getMessage() and "25 were dropped" in r.getMessage() for r in caplog.records)


def test_penultimate_layer_matches_transformers(tiny_eps_model, hf_text_model, hf_tokenizer):
    embedder = tiny_eps_model.cond_stage_model
    assert embedder.layer == "penultimate"
    ids = reference_ids(hf_tokenizer, PROMPTS)
    with torch.no_grad():
        ours = tiny_eps_model.get_learned_conditioning(PROMPTS)
        hidden = hf_text_model(ids, output_hidden_states=True).hidden_states
        ref = hf_text_model.final_layer_norm(hidden[-2])
    assert ours.shape == (len(PROMPTS), 77, 48)
    assert rel_err(ours, ref) <= RTOL


def test_last_layer_matches_transformers(tiny_eps_model, hf_text_model, hf_tokenizer):
    embedder = FrozenOpenCLIPEmbedder(arch=TINY_ARCH, device="cpu", layer="last")
    embedder.load_state_dict(tiny_eps_model.cond_stage_model.state_dict(), strict=True)
    ids = reference_ids(hf_tokenizer, PROMPTS)
    with torch.no_grad():
        ours = embedder(PROMPTS)
        ref = hf_text_model(ids).last_hidden_state
    assert rel_err(ours, ref) <= RTOL
    assert not torch.allclose(ours, tiny_eps_model.get_learned_conditioning(PROMPTS))


def test_only_the_text_tower_is_built_and_frozen(tiny_eps_model):
    embedder = tiny_eps_model.cond_stage_model
    names = list(embedder.state_dict())
    assert not any("visual" in n for n in names)
    assert "model.logit_scale" in names and "model.text_projection" in names
    assert not any(p.requires_grad for p in embedder.parameters())


def test_builtin_arch_builds_on_meta():
    """ViT-H-14 (SD2's text tower) resolves from open_clip's own configs: nothing downloaded."""
    with torch.device("meta"):
        embedder = FrozenOpenCLIPEmbedder(arch="ViT-H-14", version="laion2b_s32b_b79k", layer="penultimate")
    assert embedder.model.token_embedding.weight.shape == (49408, 1024)
    assert len(embedder.model.transformer.resblocks) == 24
    assert not embedder.model.attn_mask.is_meta


def test_bad_arch_and_layer_are_clear_errors():
    with pytest.raises(ValueError, match="not fetched"):
        FrozenOpenCLIPEmbedder(arch="hf-hub:laion/CLIP-ViT-H-14-laion2B-s32B-b79K")
    with pytest.raises(ValueError, match="NoSuchArch"):
        FrozenOpenCLIPEmbedder(arch="NoSuchArch")
    with pytest.raises(ValueError, match="layer"):
        FrozenOpenCLIPEmbedder(arch=TINY_ARCH, layer="first")
