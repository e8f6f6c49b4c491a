"""The OpenCLIP text encoder that turns prompts into SD2's cross-attention context."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import open_clip
import torch
from open_clip.model import _build_text_tower
from torch import nn

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
        text.logit_scale = nn.Parameter(torch.empty(()))  # kept so the checkpoint's key loads strictly
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

    def tokenize(self, text: Sequence[str]) -> torch.Tensor:
        """Token ids (batch, max_length), truncated to the context length as open_clip does,
        with a warning naming how many tokens of a too-long prompt were dropped."""
        text = list(text)
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
        x = self.model.token_embedding(tokens) + self.model.positional_embedding
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
