"""Lightning callbacks: atomic periodic checkpoints that carry the run's config."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import pytorch_lightning as pl

from ldm.fileio import atomic_path

logger = logging.getLogger(__name__)

CONFIG_KEY = "ldm_training_config"
"""Checkpoint entry holding the YAML of the ``model`` section that produced it."""


class AtomicCheckpoint(pl.Callback):
    """Writes ``dirpath/last.ckpt`` every ``every_n_train_steps`` optimizer steps and at the end.

    Each write goes to a temporary file that then replaces ``last.ckpt``, so a run killed
    mid-write still has its previous checkpoint. The checkpoint records ``config_yaml``
    under :data:`CONFIG_KEY` so that a resume can check it belongs to the same config.
    """

    def __init__(self, dirpath: str | os.PathLike, every_n_train_steps: int, config_yaml: str):
        super().__init__()
        if every_n_train_steps < 1:
            raise ValueError(f"every_n_train_steps must be at least 1, got {every_n_train_steps}")
        self.dirpath = Path(dirpath)
        self.every_n_train_steps = every_n_train_steps
        self.config_yaml = config_yaml
        self._last_saved_step = -1

    @property
    def last_path(self) -> Path:
        return self.dirpath / "last.ckpt"

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint[CONFIG_KEY] = self.config_yaml

    def save(self, trainer: pl.Trainer) -> None:
        if trainer.global_step == self._last_saved_step:
            return
        self._last_saved_step = trainer.global_step
        if not trainer.is_global_zero:  # under DDP every rank takes part in saving, only rank 0 writes
            trainer.save_checkpoint(self.last_path)
            return
        self.dirpath.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.last_path, overwrite=True) as tmp:
            trainer.save_checkpoint(tmp)
        logger.info("step %d: checkpoint written to %s", trainer.global_step, self.last_path)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if trainer.global_step % self.every_n_train_steps == 0:
            self.save(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.save(trainer)
