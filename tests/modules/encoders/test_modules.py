"""The OpenCLIP text encoder against transformers' CLIPTextModel holding the same weights
(converted by diffusers' ``convert_open_clip_checkpoint``), and its tokenizer against
transformers' CLIPTokenizer built from the same BPE vocabulary.

SD2 conditions on the penultimate layer's output passed through the final layer norm
(``layer: "penultimate"``); ``"last"`` is the usual last hidden state. Tolerance: relative
error 1e-4 (float32 rounding; the two implementations happen to agree to the bit here).

Stable unCLIP's image embedders against transformers' CLIPVisionModelWithProjection holding the
same tower (QuickGELU for unCLIP-L's OpenAI CLIP, GELU for unCLIP-H's OpenCLIP): relative error
1e-4 (float32 rounding through the tower; observed ~2e-7). Their preprocessing against kornia,
which the original uses (antialiased bicubic resize, CLIP normalisation): 1e-6 absolute on
values in [-2, 2] (the Gaussian blur is applied separably here, as a 2-D kernel in the original's
kornia; observed 2.4e-7). unCLIP's embedding noise augmentation against diffusers'
StableUnCLIPImg2ImgPipeline.noise_image_embeddings with identical noise: 1e-5 relative
(diffusers' float32 schedule, whose 1 - alphas_cumprod keeps few digits at level 0: observed
1.6e-6 there, 2e-7 at level 100).
"""

from __future__ import annotations

import pytest
import torch

from conftest import FIXTURES, rel_err, transformers_text_twin, transformers_tokenizer, transformers_vision_twin, write_clip_stats
from ldm.modules.encoders.modules import (
    CLIPEmbeddingNoiseAugmentation,
    ClipImageEmbedder,
    FrozenOpenCLIPEmbedder,
    FrozenOpenCLIPImageEmbedder,
    resize_antialiased,
)

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
    return transformers_text_twin(tiny_eps_model.cond_stage_model)


@pytest.fixture(scope="module")
def hf_tokenizer(tiny_eps_model):
    return transformers_tokenizer(tiny_eps_model.cond_stage_model, pad_with_zero=False)


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


# -- Stable unCLIP: image embedders and the embedding noise augmentation ---------------------
def images(batch: int = 2, size: tuple[int, int] = (48, 40), seed: int = 3) -> torch.Tensor:
    return torch.rand(batch, 3, *size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.fixture(scope="module", params=["l", "h"])
def embedder(request, tiny_unclip_models):
    return tiny_unclip_models[request.param].embedder


def test_image_embedding_matches_transformers(embedder):
    reference = transformers_vision_twin(embedder)
    x = images()
    with torch.no_grad():
        ours = embedder(x)
        ref = reference(embedder.preprocess(x)).image_embeds
    assert ours.shape == (2, 32)
    assert ref.abs().mean() > 0.1
    assert rel_err(ours, ref) <= RTOL


@pytest.mark.parametrize("shape", [(64, 64), (100, 77), (48, 80), (16, 20)], ids=["2x", "uneven", "mixed", "upscale"])
def test_preprocessing_matches_the_originals_kornia(embedder, shape):
    kornia = pytest.importorskip("kornia")
    x = images(size=shape)
    ref = kornia.geometry.resize(x, (32, 32), interpolation="bicubic", align_corners=True, antialias=True)
    ref = kornia.enhance.normalize((ref + 1.0) / 2.0, embedder.mean, embedder.std)
    assert (embedder.preprocess(x) - ref).abs().max() <= 1e-6


def test_resize_at_the_real_towers_size_matches_kornia():
    kornia = pytest.importorskip("kornia")
    x = images(batch=1, size=(768, 512))
    ref = kornia.geometry.resize(x, (224, 224), interpolation="bicubic", align_corners=True, antialias=True)
    assert (resize_antialiased(x, (224, 224)) - ref).abs().max() <= 1e-6


def test_image_embedders_hold_the_original_layouts(tiny_unclip_models):
    """-L keeps OpenAI CLIP whole (text transformer included), -H OpenCLIP without its text
    transformer; neither has a non-checkpoint tensor but CLIP's mean and std; both are frozen."""
    for kind, model in tiny_unclip_models.items():
        embedder = model.embedder
        names = set(embedder.state_dict())
        assert {"model.visual.proj", "model.token_embedding.weight", "model.text_projection", "model.logit_scale"} <= names
        assert any(n.startswith("model.transformer.") for n in names) == (kind == "l")
        assert {n for n, _ in embedder.named_buffers()} == {"mean", "std"}
        assert not any(p.requires_grad for p in embedder.parameters())


def test_real_image_embedders_build_on_meta():
    """The unCLIP configs' towers from OpenCLIP's own configs: ViT-L/14 with QuickGELU (OpenAI's),
    ViT-H-14 with GELU. Nothing is downloaded."""
    from open_clip.transformer import QuickGELU

    with torch.device("meta"):
        large = ClipImageEmbedder(model="ViT-L/14")
        huge = FrozenOpenCLIPImageEmbedder()
    assert large.model.visual.proj.shape == (1024, 768) and huge.model.visual.proj.shape == (1280, 1024)
    assert isinstance(large.model.visual.transformer.resblocks[0].mlp.gelu, QuickGELU)
    assert not isinstance(huge.model.visual.transformer.resblocks[0].mlp.gelu, QuickGELU)
    assert not large.mean.is_meta and tuple(huge.model.visual.image_size) == (224, 224)


def test_image_embedder_options_the_original_does_not_support_are_errors():
    with pytest.raises(ValueError, match="pooled"):
        FrozenOpenCLIPImageEmbedder(arch=TINY_ARCH, layer="penultimate")
    with pytest.raises(ValueError, match="ucg_rate"):
        ClipImageEmbedder(model=TINY_ARCH, ucg_rate=0.1)
    with pytest.raises(ValueError, match="jit"):
        ClipImageEmbedder(model=TINY_ARCH, jit=True)


def karlo_augmentation(stats_path=None) -> CLIPEmbeddingNoiseAugmentation:
    """The unCLIP configs' augmentation (squaredcos_cap_v2 schedule) for 32-dim embeddings."""
    schedule = {"timesteps": 1000, "beta_schedule": "squaredcos_cap_v2"}
    return CLIPEmbeddingNoiseAugmentation(noise_schedule_config=schedule, clip_stats_path=stats_path, timestep_dim=32)


def noise_image_embeddings(embeddings, noise_level, noise, mean, std):
    """diffusers' StableUnCLIPImg2ImgPipeline.noise_image_embeddings on a pipeline holding only
    what the method uses: the image normalizer (the statistics) and the noising scheduler."""
    from types import SimpleNamespace

    from diffusers import DDPMScheduler, StableUnCLIPImg2ImgPipeline
    from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import StableUnCLIPImageNormalizer

    normalizer = StableUnCLIPImageNormalizer(embedding_dim=embeddings.shape[1])
    normalizer.load_state_dict({"mean": mean, "std": std})
    pipe = SimpleNamespace(
        image_normalizer=normalizer,
        image_noising_scheduler=DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2"),
    )
    return StableUnCLIPImg2ImgPipeline.noise_image_embeddings(pipe, embeddings, noise_level, noise=noise)


@pytest.mark.parametrize("stats", ["karlo", "none"])
@pytest.mark.parametrize("noise_level", [0, 100, 999])
def test_embedding_augmentation_matches_the_unclip_pipeline(stats, noise_level, tmp_path):
    augmentation = karlo_augmentation(write_clip_stats(tmp_path / "stats.th") if stats == "karlo" else None)
    embeddings = torch.randn(2, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.manual_seed(5)
        noised, level_embedding = augmentation(embeddings, noise_level)
        noise = torch.randn(2, 32, generator=torch.Generator().manual_seed(5))  # the pipeline's draw
        ref = noise_image_embeddings(embeddings, noise_level, noise, augmentation.data_mean, augmentation.data_std)
    assert (stats == "none") == bool((augmentation.data_std == 1).all())
    assert rel_err(torch.cat([noised, level_embedding], 1), ref) <= 1e-5


def test_diffusers_image_normalizer_file_gives_the_same_statistics(tmp_path):
    from safetensors.torch import save_file

    karlo = karlo_augmentation(write_clip_stats(tmp_path / "ViT-L-14_stats.th"))
    save_file({"mean": karlo.data_mean.clone(), "std": karlo.data_std.clone()}, tmp_path / "normalizer.safetensors")
    diffusers_file = karlo_augmentation(tmp_path / "normalizer.safetensors")
    assert torch.equal(diffusers_file.data_mean, karlo.data_mean) and torch.equal(diffusers_file.data_std, karlo.data_std)
    assert karlo.data_mean.shape == (1, 32) and "data_mean" not in karlo.state_dict()


def test_missing_statistics_file_fails_only_when_used_and_says_what_it_is(tmp_path, caplog):
    missing = tmp_path / "checkpoints" / "karlo_models" / "ViT-L-14_stats.th"
    with caplog.at_level("WARNING"):
        augmentation = karlo_augmentation(missing)  # builds: the model still loads and encodes text
    assert str(missing) in caplog.text
    with pytest.raises(FileNotFoundError) as err:
        augmentation(torch.zeros(1, 32), 0)
    message = str(err.value)
    assert str(missing) in message and "Karlo" in message and "clip_stats_path" in message
    augmentation.load_clip_stats(write_clip_stats(tmp_path / "given.th"))
    noised, _ = augmentation(torch.zeros(1, 32), 0)
    assert noised.shape == (1, 32)


def test_statistics_of_another_width_are_refused(tmp_path):
    with pytest.raises(ValueError, match="32 values"):
        karlo_augmentation(write_clip_stats(tmp_path / "stats.th", dim=768))
