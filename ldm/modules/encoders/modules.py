"""The encoders of SD2's conditioning: the OpenCLIP text encoder that turns prompts into the
cross-attention context; for Stable unCLIP, the CLIP image embedders (OpenAI CLIP ViT-L/14,
OpenCLIP ViT-H/14) and the noise augmentation of their embeddings."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Mapping, Sequence

import open_clip
import torch
import torch.nn.functional as F
from open_clip.model import CLIP, _build_text_tower
from torch import nn

from ldm.modules.diffusionmodules.openaimodel import Timestep
from ldm.modules.diffusionmodules.upscaling import ImageConcatWithNoiseAugmentation

logger = logging.getLogger(__name__)

# Text-tower configs shipped with this package (e.g. the demo model's) become open_clip names.
_PACKAGE_CONFIGS = Path(__file__).resolve().parent / "open_clip_configs"
if any(_PACKAGE_CONFIGS.glob("*.json")):
    open_clip.add_model_config(_PACKAGE_CONFIGS)


def open_clip_model_config(arch: str) -> dict:
    """The model config open_clip resolves for ``arch`` from local files only.

    ``arch`` is a built-in or registered config name (``ViT-H-14``) or ``local-dir:PATH``
    (a folder holding ``open_clip_config.json``); ``hf-hub:`` names are refused, since
    nothing is ever downloaded.
    """
    if arch.startswith("hf-hub:"):
        raise ValueError(f"{arch!r}: hub models are not fetched; use a built-in name or local-dir:PATH")
    try:
        config = open_clip.get_model_config(arch)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"open_clip config for {arch!r} not found: {e}") from e
    if config is None:
        raise ValueError(f"open_clip knows no model config named {arch!r} (see open_clip.list_models())")
    return config


class FrozenOpenCLIPEmbedder(nn.Module):
    """Token embeddings of an OpenCLIP text tower, from its last or penultimate layer.

    Only the text tower is built; its weights come from the SD checkpoint
    (``cond_stage_model.model.*``), never from the network. ``version`` is accepted for
    compatibility with the original configs and ignored.
    """

    LAYERS = ("last", "penultimate")

    def __init__(
        self,
        arch: str = "ViT-H-14",
        version: str = "laion2b_s32b_b79k",
        device: str = "cuda",
        max_length: int = 77,
        freeze: bool = True,
        layer: str = "last",
    ):
        super().__init__()
        if layer not in self.LAYERS:
            raise ValueError(f"layer must be one of {self.LAYERS}, got {layer!r}")
        config = open_clip_model_config(arch)
        text = _build_text_tower(config["embed_dim"], config["text_cfg"], config.get("quick_gelu", False))
        text.logit_scale = nn.Parameter(torch.full((), math.log(1 / 0.07)))  # unused; kept so the checkpoint's key loads strictly (CLIP's initial value)
        # The causal mask is not in checkpoints: make it on the CPU even when built on "meta".
        text.register_buffer("attn_mask", _causal_mask(text.context_length), persistent=False)
        # Run the blocks sequence-first, as the original did: batch-first attention transposes
        # its input, and the projection of that strided view is a slow batched matmul.
        for block in text.transformer.resblocks:
            block.attn.batch_first = False
        self.model = text
        self.tokenizer = open_clip.get_tokenizer(arch)
        self.max_length = max_length
        self.layer = layer
        self.layer_idx = self.LAYERS.index(layer)
        if freeze:
            self.freeze()

    def freeze(self) -> None:
        self.model.eval()
        for p in self.parameters():
            p.requires_grad = False

    def tokenize(self, text: str | Sequence[str]) -> torch.Tensor:
        """Token ids (batch, max_length), truncated to the context length as open_clip does,
        with a warning naming how many tokens of a too-long prompt were dropped. One string is
        a batch of one, as for open_clip (the original demos pass ``""``)."""
        text = [text] if isinstance(text, str) else list(text)
        encode = getattr(self.tokenizer, "encode", None)
        if callable(encode):
            room = self.max_length - 2  # start and end tokens
            for prompt in dict.fromkeys(text):
                n = len(encode(prompt))
                if n > room:
                    logger.warning(
                        "prompt is %d tokens long, the text encoder takes %d: the last %d were dropped (%r)",
                        n, room, n - room, prompt[:60],
                    )
        return self.tokenizer(text, context_length=self.max_length)

    def forward(self, text: Sequence[str]) -> torch.Tensor:
        tokens = self.tokenize(text).to(self.model.token_embedding.weight.device)
        return self.encode_with_transformer(tokens)

    def encode_with_transformer(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.encode_token_embeddings(self.model.token_embedding(tokens))

    def encode_token_embeddings(self, x: torch.Tensor) -> torch.Tensor:
        """The encoder's output for token embeddings ``x`` (batch, context, width): the seam where
        textual-inversion vectors take the place of token embeddings (``ldm.modules.encoders.prompts``)."""
        x = x + self.model.positional_embedding
        x = x.transpose(0, 1).contiguous()  # (tokens, batch, width)
        blocks = self.model.transformer.resblocks
        mask = self.model.attn_mask
        for block in blocks[: len(blocks) - self.layer_idx]:
            x = block(x, attn_mask=mask)
        return self.model.ln_final(x.transpose(0, 1))

    def encode(self, text: Sequence[str]) -> torch.Tensor:
        return self(text)


def _causal_mask(n: int) -> torch.Tensor:
    return torch.full((n, n), float("-inf"), device="cpu").triu_(1)


# -- Stable unCLIP: image embedders and the noise augmentation of their embeddings ------------

# CLIP's image normalisation (OpenAI's values, which OpenCLIP's ViT-H/14 was trained with too).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def resize_antialiased(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bicubic resize with aligned corners of a batch (B, C, H, W), blurred first when
    downscaling: what the original's ``kornia.geometry.resize(..., interpolation="bicubic",
    align_corners=True, antialias=True)`` computes (a Gaussian of sigma (factor - 1) / 2 per axis,
    kernel about 4 sigma wide and odd, reflected borders), without needing kornia."""
    factors = (x.shape[-2] / size[0], x.shape[-1] / size[1])
    if max(factors) > 1:
        channels = x.shape[1]
        for axis, factor in enumerate(factors):
            sigma = max((factor - 1.0) / 2.0, 0.001)
            width = int(max(4.0 * sigma, 3))
            width += 1 - width % 2
            taps = torch.arange(width, dtype=torch.float32, device=x.device) - width // 2
            kernel = torch.exp(-taps.pow(2) / (2 * sigma**2))
            kernel = (kernel / kernel.sum()).to(x.dtype)
            half = width // 2
            shape, pad = ((width, 1), (0, 0, half, half)) if axis == 0 else ((1, width), (half, half, 0, 0))
            kernel = kernel.reshape(1, 1, *shape).expand(channels, 1, *shape)
            x = F.conv2d(F.pad(x, pad, mode="reflect"), kernel, groups=channels)
    return F.interpolate(x, size=size, mode="bicubic", align_corners=True)


def _clip_model(config: dict, quick_gelu: bool, text_transformer: bool) -> CLIP:
    """An OpenCLIP ``CLIP`` in the layout the unCLIP checkpoints store under ``embedder.model``:
    the image tower, and the text tower whole or, without ``text_transformer``, its embeddings,
    final norm and projection only (the original deletes ``model.transformer``). The text side
    is never run: it is there so that checkpoints load strictly."""
    text_cfg = dict(config["text_cfg"], **({} if text_transformer else {"layers": 1}))  # one block, then none
    model = CLIP(config["embed_dim"], config["vision_cfg"], text_cfg, quick_gelu=quick_gelu)
    if not text_transformer:
        del model.transformer
    del model.attn_mask  # the text tower's causal mask: not a checkpoint tensor, never used here
    return model


class _FrozenImageEmbedder(nn.Module):
    """What both image embedders share: the original's preprocessing (images in [-1, 1], resized
    to the tower's input size, mapped to [0, 1] and normalised with CLIP's mean and std) and the
    pooled, projected embedding of the image tower, computed in the dtype of its weights and
    returned in the image's dtype."""

    def __init__(self, model: CLIP, antialias: bool, ucg_rate: float):
        super().__init__()
        if ucg_rate:
            raise ValueError(f"ucg_rate={ucg_rate}: training-time embedding dropout is not supported")
        self.model = model
        self.antialias = antialias
        self.register_buffer("mean", torch.tensor(CLIP_MEAN, device="cpu"), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD, device="cpu"), persistent=False)

    def freeze(self) -> None:
        self.model.eval()
        for p in self.parameters():
            p.requires_grad = False

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        size = tuple(self.model.visual.image_size)
        if self.antialias:
            x = resize_antialiased(x, size)
        else:
            x = F.interpolate(x, size=size, mode="bicubic", align_corners=True)
        x = (x + 1.0) / 2.0
        return (x - self.mean[:, None, None]) / self.std[:, None, None]

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Embeddings (B, embed_dim) of images (B, 3, H, W) in [-1, 1]."""
        x = self.preprocess(image).to(self.model.visual.conv1.weight.dtype)
        return self.model.visual(x).to(image.dtype)

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        return self(image)


def _openai_arch(name: str) -> str:
    """OpenAI CLIP's model names (``ViT-L/14``, ``ViT-L/14@336px``) as OpenCLIP config names."""
    return name.replace("@336px", "-336").replace("/", "-") if not name.startswith("local-dir:") else name


class ClipImageEmbedder(_FrozenImageEmbedder):
    """OpenAI CLIP's image embedding (Stable unCLIP-L: ``model: "ViT-L/14"``, 768 dimensions).

    The original loads the whole OpenAI model with ``clip.load`` (which downloads it); here the
    same architecture is built with OpenCLIP (QuickGELU, the keys and shapes of OpenAI's
    ``clip/model.py``) and filled from the unCLIP checkpoint, which holds it under
    ``embedder.model`` with its text tower. ``model`` may also be an OpenCLIP config name or
    ``local-dir:PATH``. ``device`` is accepted and ignored; ``jit`` must stay off.
    """

    def __init__(
        self, model: str, jit: bool = False, device: str | None = None, antialias: bool = True, ucg_rate: float = 0.0
    ):
        if jit:
            raise ValueError("jit=True (OpenAI's TorchScript model) is not supported")
        config = open_clip_model_config(_openai_arch(model))
        super().__init__(_clip_model(config, quick_gelu=True, text_transformer=True), antialias, ucg_rate)


class FrozenOpenCLIPImageEmbedder(_FrozenImageEmbedder):
    """OpenCLIP's image embedding (Stable unCLIP-H: ViT-H/14, 1024 dimensions), the pooled and
    projected output of the image tower (``layer: "pooled"``, the only layer the original supports).

    Built from OpenCLIP's config without weights, the text transformer removed as in the
    original; the weights come from the checkpoint (``embedder.model.*``). ``version``,
    ``device`` and ``max_length`` are accepted for the original configs and ignored.
    """

    def __init__(
        self,
        arch: str = "ViT-H-14",
        version: str = "laion2b_s32b_b79k",
        device: str = "cuda",
        max_length: int = 77,
        freeze: bool = True,
        layer: str = "pooled",
        antialias: bool = True,
        ucg_rate: float = 0.0,
    ):
        if layer != "pooled":
            raise ValueError(f"layer must be 'pooled' (the only layer the original implements), got {layer!r}")
        config = open_clip_model_config(arch)
        super().__init__(_clip_model(config, config.get("quick_gelu", False), text_transformer=False), antialias, ucg_rate)
        self.layer = layer
        if freeze:
            self.freeze()


KARLO_STATS_HELP = (
    "the CLIP ViT-L/14 image-embedding statistics (ViT-L-14_stats.th: the mean and standard deviation "
    "of 768-dim embeddings, released by Kakao Brain with Karlo; the original's doc/UNCLIP.MD downloads "
    "it to checkpoints/karlo_models/). Stable unCLIP-L normalises its image embedding with them before "
    "noise augmentation, and its checkpoint does not hold them. Pass the file's path as clip_stats_path "
    "(config: model.params.noise_aug_config.params.clip_stats_path); diffusers' "
    "image_normalizer/diffusion_pytorch_model.safetensors of stable-diffusion-2-1-unclip-small, which "
    "holds the same statistics as 'mean' and 'std', is accepted too"
)


class CLIPEmbeddingNoiseAugmentation(ImageConcatWithNoiseAugmentation):
    """unCLIP's noise augmentation of a CLIP image embedding: normalised with the embedding
    statistics (``clip_stats_path``; mean 0 and std 1 without it, as unCLIP-H uses), diffused to
    the noise level with its own schedule (``squaredcos_cap_v2`` in the configs), un-normalised,
    and returned with the sinusoidal embedding of the level (``timestep_dim`` wide).

    The statistics are non-persistent buffers, as in the original: no checkpoint holds them.
    A ``clip_stats_path`` that does not exist is not an error until the augmentation is used,
    so that the model still builds and loads (e.g. for text conditioning or conversion).
    """

    def __init__(self, *args, clip_stats_path: str | os.PathLike | None = None, timestep_dim: int = 256, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("data_mean", torch.zeros(1, timestep_dim, device="cpu"), persistent=False)
        self.register_buffer("data_std", torch.ones(1, timestep_dim, device="cpu"), persistent=False)
        self.time_embed = Timestep(timestep_dim)
        self.missing_stats: str | None = None
        if clip_stats_path is not None:
            if os.path.isfile(clip_stats_path):
                self.load_clip_stats(clip_stats_path)
            else:
                self.missing_stats = str(clip_stats_path)
                logger.warning("clip_stats_path %s not found: image conditioning will fail until the embedding "
                               "statistics are given (load_clip_stats)", clip_stats_path)

    def load_clip_stats(self, path: str | os.PathLike) -> None:
        """Take the embedding mean and std from ``path``: Karlo's ``ViT-L-14_stats.th`` (a pair of
        tensors) or a file holding ``mean`` and ``std`` (diffusers' image normalizer)."""
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} not found; it should be {KARLO_STATS_HELP}")
        if str(path).endswith(".safetensors"):
            from safetensors.torch import load_file

            stats = load_file(path)
        else:
            stats = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(stats, Mapping):
            stats = (stats.get("mean"), stats.get("std"))
        dim = self.data_mean.shape[1]
        if not (
            isinstance(stats, (tuple, list)) and len(stats) == 2
            and all(isinstance(t, torch.Tensor) and t.numel() == dim for t in stats)
        ):
            raise ValueError(f"{path} does not hold a mean and a std of {dim} values; it should be {KARLO_STATS_HELP}")
        mean, std = (t.reshape(1, dim).to(device=self.data_mean.device, dtype=torch.float32) for t in stats)
        self.data_mean, self.data_std = mean, std
        self.missing_stats = None

    def scale(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.data_mean) * 1.0 / self.data_std

    def unscale(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.data_std + self.data_mean

    def forward(self, x: torch.Tensor, noise_level: int | torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(noised embedding, embedding of the noise level)``, both float32 (B, timestep_dim);
        the noise is drawn as ``torch.randn_like`` of the normalised embedding, after random
        levels when ``noise_level`` is None (as the original's training)."""
        if self.missing_stats is not None:
            raise FileNotFoundError(f"{self.missing_stats} not found: it should be {KARLO_STATS_HELP}")
        levels = self.noise_levels(self.random_levels(x) if noise_level is None else noise_level, x.shape[0])
        return self.unscale(self.q_sample(self.scale(x.float()), levels)), self.time_embed(levels)
