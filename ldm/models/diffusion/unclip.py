"""Stable unCLIP (SD 2.1 unCLIP-L and -H): latent diffusion conditioned on the text and on a
CLIP image embedding, noise-augmented and joined with the embedding of its noise level, which
the UNet takes as its class-label vector (``c_adm``)."""

from __future__ import annotations

from typing import Any, Mapping

import torch

from ldm.models.diffusion.ddpm import LatentDiffusion, channels_first, repeat_to_batch
from ldm.util import instantiate_from_config


class ImageEmbeddingConditionedLatentDiffusion(LatentDiffusion):
    """``LatentDiffusion`` with the original's ``embedder`` (a CLIP image tower, frozen) and
    ``noise_augmentor`` (a :class:`~ldm.modules.encoders.modules.CLIPEmbeddingNoiseAugmentation`,
    or none). ``embedding_key`` and ``embedding_dropout`` steer only the original's training and
    are kept as attributes.
    """

    def __init__(
        self,
        embedder_config: Mapping[str, Any],
        embedding_key: str = "jpg",
        embedding_dropout: float = 0.5,
        freeze_embedder: bool = True,
        noise_aug_config: Mapping[str, Any] | None = None,
        *args: Any,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        self.embed_key = embedding_key
        self.embedding_dropout = embedding_dropout
        self.embedder = instantiate_from_config(embedder_config)
        if freeze_embedder:
            self.embedder.eval()
            for p in self.embedder.parameters():
                p.requires_grad = False
        self.noise_augmentor = instantiate_from_config(noise_aug_config).eval() if noise_aug_config else None

    @torch.no_grad()
    def image_conditioning(
        self,
        image: torch.Tensor,
        noise_level: int | torch.Tensor | None,
        context: torch.Tensor,
        unconditional_context: torch.Tensor | None = None,
    ) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """The sampler's conditioning for variations of ``image`` (B or 1, 3, H, W) in [-1, 1],
        or of a given image embedding (B or 1, D) (e.g. from the Karlo prior), as the original's
        demo (scripts/streamlit/stableunclip.py) builds it.

        The image, repeated to the batch of ``context`` when it is one, is embedded; the
        embedding is noise-augmented to ``noise_level`` (0 to 999; the demo's default is 0; None
        draws one per sample, as the original's training) with one ``torch.randn_like`` draw of its shape, and joined with the level's embedding.
        Returns ``(cond, uncond)``: ``cond`` = ``{"c_crossattn": [context], "c_adm": embedding}``;
        ``uncond`` = ``{"c_crossattn": [unconditional_context], "c_adm": zeros}`` (the original
        guides away from a zero embedding), or None without ``unconditional_context``.
        """
        image = repeat_to_batch(image, context.shape[0], "images or embeddings").to(self.device)
        embedding = self.embedder(image) if image.ndim == 4 else image
        if self.noise_augmentor is None:
            c_adm = embedding
        else:
            noised, level_embedding = self.noise_augmentor(embedding, noise_level)
            c_adm = torch.cat((noised, level_embedding), 1)
        cond = {"c_crossattn": [context], "c_adm": c_adm}
        if unconditional_context is None:
            return cond, None
        return cond, {"c_crossattn": [unconditional_context], "c_adm": torch.zeros_like(c_adm)}

    def get_input(self, batch: Mapping[str, Any], k: str, cond_key: str | None = None, bs: int | None = None, **kwargs: Any) -> list:
        """``[z, {"c_crossattn": [c], "c_adm": embedding}, ...]`` for a data batch, as the original:
        :meth:`LatentDiffusion.get_input` (``kwargs`` ask for its extra outputs), then the images
        under ``embedding_key`` embedded and noise-augmented to a random level each; in training
        mode the embedding is dropped (zeroed) with probability ``embedding_dropout``."""
        outputs = LatentDiffusion.get_input(self, batch, k, bs=bs, **kwargs)
        cond, _ = self.image_conditioning(channels_first(batch[self.embed_key][:bs]), None, outputs[1])
        if self.training:
            c_adm = cond["c_adm"]
            keep = torch.full((c_adm.shape[0], 1), 1.0 - self.embedding_dropout, device=c_adm.device)
            cond["c_adm"] = torch.bernoulli(keep) * c_adm
        return [outputs[0], cond, *outputs[2:]]
