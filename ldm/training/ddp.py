"""Lightning callbacks for training on several ranks (DDP): each rank's own random stream, and a
check that the ranks end with the same weights. Both do nothing with one rank."""

from __future__ import annotations

import hashlib
import logging
import random
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch

logger = logging.getLogger(__name__)


class RankSeeds(pl.Callback):
    """Gives each rank its own random stream (``seed + global rank``) once the processes exist.

    Lightning seeds every rank alike, so without this each rank would draw the same timesteps,
    noise and caption dropouts for its (different) samples. Data order is left alone: the
    DistributedSampler shares one seeded permutation among the ranks. One process: nothing changes.
    """

    def __init__(self, seed: int):
        self.seed = seed

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if trainer.world_size > 1:
            seed = self.seed + trainer.global_rank
            random.seed(seed)
            np.random.seed(seed % 2**32)
            torch.manual_seed(seed)


def weights_digest(module: torch.nn.Module) -> str:
    """SHA-256 of every tensor of the state dict (names, dtypes, shapes and bytes)."""
    h = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        t = tensor.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}:{t.dtype}:{tuple(tensor.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class SameWeightsCheck(pl.Callback):
    """At the end of training, checks that every rank holds the same weights (DDP keeps them in
    step; a difference means some state escaped synchronisation) and logs the outcome."""

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.world_size < 2:
            return
        import torch.distributed as dist

        digests: list[Any] = [None] * trainer.world_size
        dist.all_gather_object(digests, weights_digest(pl_module))
        if trainer.is_global_zero:
            if len(set(digests)) == 1:
                logger.info("the weights of the %d ranks are identical (sha256 %s)", len(digests), digests[0][:16])
            else:
                logger.error("the ranks' weights differ (sha256 by rank: %s): the exported weights are rank 0's",
                             ", ".join(d[:16] for d in digests))
