"""Lightning callbacks: atomic periodic checkpoints that carry the run's config, a checkpoint
on SIGTERM, and the global random generators' state, so that a resumed run continues exactly."""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities.exceptions import SIGTERMException

from ldm.fileio import atomic_path

logger = logging.getLogger(__name__)

CONFIG_KEY = "ldm_training_config"
"""Checkpoint entry holding the YAML of the ``model`` section that produced it."""


class AtomicCheckpoint(pl.Callback):
    """Writes ``dirpath/last.ckpt`` every ``every_n_train_steps`` optimizer steps, at the last
    step (``max_steps``), at the end, and after the step during which a SIGTERM arrived.

    Each write goes to a temporary file that then replaces ``last.ckpt``, so a run killed
    mid-write still has its previous checkpoint. The checkpoint records ``config_yaml``
    under :data:`CONFIG_KEY` so that a resume can check it belongs to the same config.

    Lightning's SIGTERM handler only sets ``trainer.received_sigterm``; the loop raises
    ``SIGTERMException`` once the step is complete. The checkpoint is written at the end of that
    step's batch, the point every periodic checkpoint is taken at (or, should the signal arrive
    after it, when the exception passes), so the run resumes after the last completed step.
    """

    def __init__(self, dirpath: str | os.PathLike, every_n_train_steps: int, config_yaml: str):
        super().__init__()
        if every_n_train_steps < 1:
            raise ValueError(f"every_n_train_steps must be at least 1, got {every_n_train_steps}")
        self.dirpath = Path(dirpath)
        self.every_n_train_steps = every_n_train_steps
        self.config_yaml = config_yaml
        self.last_saved_step = -1

    @property
    def last_path(self) -> Path:
        return self.dirpath / "last.ckpt"

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint[CONFIG_KEY] = self.config_yaml

    def save(self, trainer: pl.Trainer) -> None:
        if trainer.global_step == self.last_saved_step:
            return
        if not trainer.is_global_zero:  # under DDP every rank takes part in saving, only rank 0 writes
            trainer.save_checkpoint(self.last_path, weights_only=False)
            self.last_saved_step = trainer.global_step
            return
        self.dirpath.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.last_path, overwrite=True) as tmp:
            trainer.save_checkpoint(tmp, weights_only=False)  # the full training state, optimizer included
        self.last_saved_step = trainer.global_step
        logger.info("step %d: checkpoint written to %s", trainer.global_step, self.last_path)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if step % self.every_n_train_steps == 0 or step == trainer.max_steps or trainer.received_sigterm:
            self.save(trainer)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException):
            self.save(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.save(trainer)


class RandomState(pl.Callback):
    """Saves the global generators of torch (CPU and CUDA), numpy and Python with each checkpoint,
    and puts them back when a resumed run starts training (after Lightning's set-up, just before
    the first batch), so that noise, timesteps and dropout continue the interrupted run's streams.

    The states are stored as tensors and plain values, so the checkpoint loads with
    ``weights_only=True``.
    """

    def __init__(self) -> None:
        self._restored: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        kind, keys, position, has_gauss, gauss = np.random.get_state()
        return {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss),
            "python": random.getstate(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = state_dict

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._restored is None:
            return
        state, self._restored = self._restored, None
        torch.set_rng_state(state["torch"])
        if state["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
        kind, keys, position, has_gauss, gauss = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
        random.setstate(state["python"])
