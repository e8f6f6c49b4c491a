"""First-stage training: the KL autoencoder with a reconstruction + KL loss.

No perceptual (LPIPS) or adversarial term: those need downloaded weights. The loss is
``mean |x - x_rec| + kl_weight * KL / (pixels * channels)``, i.e. the original's balance
between a per-pixel reconstruction sum and the KL sum, divided by the pixel count.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

import pytorch_lightning as pl
import torch

from ldm.models.autoencoder import AutoencoderKL
from ldm.util import instantiate_from_config

logger = logging.getLogger(__name__)


class AutoencoderTrainer(pl.LightningModule):
    """Trains the ``AutoencoderKL`` of ``first_stage_config`` on ``batch[image_key]`` in [-1, 1]."""

    def __init__(
        self,
        first_stage_config: Mapping[str, Any],
        learning_rate: float = 1e-3,
        kl_weight: float = 1e-6,
        image_key: str = "image",
    ):
        super().__init__()
        self.model = instantiate_from_config(first_stage_config)
        if not isinstance(self.model, AutoencoderKL):
            raise TypeError(f"first_stage_config must build an AutoencoderKL, got {type(self.model).__name__}")
        for p in self.model.parameters():
            p.requires_grad = True
        self.learning_rate = learning_rate
        self.kl_weight = kl_weight
        self.image_key = image_key

    def losses(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        rec, posterior = self.model(x)
        rec_loss = (x - rec).abs().mean()
        kl = posterior.kl().mean() / x[0].numel()
        return {"loss": rec_loss + self.kl_weight * kl, "rec_loss": rec_loss, "kl": kl}

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        losses = self.losses(batch[self.image_key])
        self.log_dict({f"train/{k}": v for k, v in losses.items()}, prog_bar=True)
        return losses["loss"]

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.model.parameters(), lr=self.learning_rate, betas=(0.5, 0.9), fused=True)

    def compile_model(self, backend: str = "inductor") -> None:
        """``torch.compile`` the autoencoder in place (its parameter names do not change)."""
        self.model.compile(backend=backend)

    @torch.no_grad()
    def latent_std(self, images: torch.Tensor) -> float:
        """Std of posterior samples of ``images``: ``1 / latent_std`` is the diffusion model's
        ``scale_factor`` (the original's ``scale_by_std``)."""
        return float(self.model.encode(images).sample().std())

    def export_state_dict(self) -> dict[str, torch.Tensor]:
        """The ``AutoencoderKL`` weights, as ``first_stage_model.*`` of an LDM checkpoint would hold them."""
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}
