"""Latent-diffusion training: the UNet learns eps or v on the latents of a trained, frozen
autoencoder, conditioned on a frozen text encoder, with an EMA of its weights."""

from __future__ import annotations

import logging
import os
import random
from typing import Any, Mapping, Sequence

import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf

from ldm.checkpoint import CheckpointError, apply_state_dict, load_state_dict
from ldm.loading import load_config
from ldm.models.diffusion.ddpm import LatentDiffusion
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.util import instantiate_from_config

logger = logging.getLogger(__name__)

TRAINER_STATE_KEY = "ldm_diffusion_trainer_state"
"""Checkpoint entry holding the trainer's own state: caption-dropout generator and caches."""


def load_first_stage(model: LatentDiffusion, path: str | os.PathLike) -> None:
    """Fill ``model.first_stage_model`` strictly from an autoencoder checkpoint (bare
    ``AutoencoderKL`` keys or ``first_stage_model.*`` keys of an LDM checkpoint)."""
    state = load_state_dict(path)
    prefix = "first_stage_model."
    if any(k.startswith(prefix) for k in state):
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    try:
        apply_state_dict(model.first_stage_model, state)
    except CheckpointError as e:
        raise CheckpointError(
            f"{path} does not fit the config's first_stage_config (was the autoencoder trained with another config?): {e}"
        ) from None


class LatentDiffusionTrainer(pl.LightningModule):
    """Trains the UNet of the ``LatentDiffusion`` built from ``ldm_config``: an inference
    config's ``model`` section (``target`` and ``params``) or that config's path; ``use_ema``
    is forced on (off for an adapter's trainer: :attr:`keeps_ema`).

    ``first_stage_ckpt`` holds the trained autoencoder. Captions are replaced by the empty
    prompt with probability ``ucg_rate``, which classifier-free guidance needs. The text
    encoder is frozen and deterministic, so each caption's embedding is computed once; the
    autoencoder is frozen too, so when batches carry an ``index`` (a fixed data set) each
    sample's latent distribution is computed once and only its noise is drawn per step.
    """

    keeps_ema: bool = True  # an EMA of the UNet's weights, exported in their place (adapter trainers keep none)

    def __init__(
        self,
        ldm_config: Mapping[str, Any] | str | os.PathLike,
        first_stage_ckpt: str | None = None,
        learning_rate: float = 1e-4,
        ucg_rate: float = 0.1,
        ema_decay: float = 0.9999,
        image_key: str = "image",
        caption_key: str = "caption",
    ):
        super().__init__()
        if not 0.0 <= ucg_rate < 1.0:
            raise ValueError(f"ucg_rate must be in [0, 1), got {ucg_rate}")
        if isinstance(ldm_config, (str, os.PathLike)):
            ldm_config = load_config(ldm_config).model
        config = OmegaConf.to_container(OmegaConf.create(dict(ldm_config)), resolve=True)
        config.setdefault("params", {}).update(use_ema=self.keeps_ema, ema_decay=ema_decay)
        self.model = instantiate_from_config(config)
        if not isinstance(self.model, LatentDiffusion):
            raise TypeError(f"ldm_config must build a LatentDiffusion, got {type(self.model).__name__}")
        if self.model.cond_stage_trainable:
            raise ValueError("cond_stage_trainable: true is not supported; the text encoder stays frozen")
        if first_stage_ckpt is not None:
            load_first_stage(self.model, first_stage_ckpt)
        else:
            logger.warning("no first_stage_ckpt: the autoencoder keeps its random weights")
        self.learning_rate = learning_rate
        self.ucg_rate = ucg_rate
        self.image_key, self.caption_key = image_key, caption_key
        self._context_cache: dict[str, torch.Tensor] = {}
        self._posterior_cache: dict[int, torch.Tensor] = {}
        self._caption_rng: random.Random | None = None

    def on_fit_start(self) -> None:
        if self._caption_rng is None:  # a resumed run has it from its checkpoint already
            self._caption_rng = random.Random(torch.initial_seed())

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Save what a resumed run needs to continue exactly: the caption-dropout generator, and
        the caches, as recomputing an entry in another batch may round differently."""
        indices = sorted(self._posterior_cache)
        checkpoint[TRAINER_STATE_KEY] = {
            "caption_rng": self._caption_rng.getstate(),
            "contexts": dict(self._context_cache),
            "posterior_indices": torch.tensor(indices, dtype=torch.long),
            "posteriors": torch.stack([self._posterior_cache[i] for i in indices]) if indices else torch.empty(0),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get(TRAINER_STATE_KEY)
        if state is None:
            logger.warning("the checkpoint predates exact resumption: caption dropout restarts its random stream")
            return
        self._caption_rng = random.Random()
        self._caption_rng.setstate(state["caption_rng"])
        self._context_cache = dict(state["contexts"])
        self._posterior_cache = dict(zip(state["posterior_indices"].tolist(), state["posteriors"]))

    def train(self, mode: bool = True) -> "LatentDiffusionTrainer":
        """Only the UNet trains; the autoencoder and the text encoder stay in eval mode."""
        super().train(mode)
        self.model.first_stage_model.eval()
        self.model.cond_stage_model.eval()
        return self

    @torch.no_grad()
    def context(self, captions: Sequence[str]) -> torch.Tensor:
        """The text encoder's output for ``captions``, each caption encoded once and cached."""
        new = [c for c in dict.fromkeys(captions) if c not in self._context_cache]
        if new:
            for caption, c in zip(new, self.model.get_learned_conditioning(new)):
                self._context_cache[caption] = c
        return torch.stack([self._context_cache[c] for c in captions]).to(self.device)

    def drop_captions(self, captions: Sequence[str]) -> list[str]:
        return ["" if self._caption_rng.random() < self.ucg_rate else c for c in captions]

    @torch.no_grad()
    def latents(self, images: torch.Tensor, indices: Sequence[int] | None = None) -> torch.Tensor:
        """Scaled latents of ``images``, sampled from the autoencoder's posterior."""
        if indices is None:
            return self.model.get_first_stage_encoding(self.model.encode_first_stage(images))
        indices = [int(i) for i in indices]
        todo = [n for n, i in enumerate(indices) if i not in self._posterior_cache]
        if todo:
            params = self.model.encode_first_stage(images[todo]).parameters
            for n, p in zip(todo, params):
                self._posterior_cache[indices[n]] = p
        params = torch.stack([self._posterior_cache[i] for i in indices]).to(images.device)
        return self.model.get_first_stage_encoding(DiagonalGaussianDistribution(params))

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        z = self.latents(batch[self.image_key], batch.get("index"))
        c = self.context(self.drop_captions(batch[self.caption_key]))
        t = torch.randint(0, self.model.num_timesteps, (z.shape[0],), device=z.device)
        loss = self.model.p_losses(z, c, t)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """The optimizer's step, then the EMA's: both are done before any checkpoint of this step."""
        super().optimizer_step(*args, **kwargs)
        if self.keeps_ema:
            self.model.model_ema(self.model.model)

    def compile_model(self, backend: str = "inductor") -> None:
        """``torch.compile`` the UNet in place (its parameter names do not change)."""
        self.model.model.diffusion_model.compile(backend=backend)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.model.model.parameters(), lr=self.learning_rate, weight_decay=0.0)

    def export_state_dict(self) -> dict[str, torch.Tensor]:
        """Inference weights: the EMA weights in place of the UNet's, without ``model_ema.*``
        (what an inference config with ``use_ema: False`` loads strictly)."""
        with self.model.ema_scope():
            return {
                k: v.detach().clone() for k, v in self.model.state_dict().items() if not k.startswith("model_ema.")
            }
