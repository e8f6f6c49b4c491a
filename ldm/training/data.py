"""The training data loader: shuffled batches whose order, and whose position inside an epoch,
a checkpoint can restore exactly, so that a resumed run sees the batches an uninterrupted one does.

It relies on two mechanisms of pytorch-lightning: the fit loop calls ``set_epoch`` on the
sampler at the start of every epoch (as it does for a ``DistributedSampler``), and it saves a
train loader's ``state_dict()`` in its checkpoints and hands it to ``load_state_dict()`` before
iterating again on resume.
"""

from __future__ import annotations

import random
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info


def _derived_seed(*entropy: int) -> int:
    """A 63-bit seed mixed from ``entropy`` (numpy's SeedSequence: nearby inputs give unrelated seeds)."""
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0] >> np.uint64(1))


class _EpochOrder(Sampler[tuple[int, int, int, int]]):
    """The epoch's permutation of ``size`` samples, a function of ``(seed, epoch)`` alone, from
    position ``start`` on, split between the ranks of a process group (DDP) as a
    ``DistributedSampler`` would. Each index comes as the key ``(seed, epoch, position, index)``."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed = size, seed
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int) -> None:
        """Lightning calls this at the start of every epoch, a resumed one included."""
        self.epoch = epoch

    @staticmethod
    def _shard() -> tuple[int, int]:
        """(rank, world size) of the process group, (0, 1) without one."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def __len__(self) -> int:
        return self.size // self._shard()[1]

    def __iter__(self) -> Iterator[tuple[int, int, int, int]]:
        """This rank's share of the epoch's permutation: every world-th position from its rank
        (the tail that does not divide evenly dropped), keyed by the position in the whole order."""
        rank, world = self._shard()
        generator = torch.Generator().manual_seed(_derived_seed(self.seed, self.epoch))
        order = torch.randperm(self.size, generator=generator).tolist()
        for local in range(self.start, self.size // world):
            position = local * world + rank
            yield self.seed, self.epoch, position, order[position]


class _WorkerSeeded(Dataset):
    """``dataset`` read by :class:`_EpochOrder` keys. In a worker process, torch's, numpy's and
    Python's global generators are seeded from the key before each sample is read, so a sample's
    random draws (augmentations) do not depend on which worker reads it or on what that worker
    read before: a resumed epoch gets the same draws. In the main process (``num_workers=0``) the
    sample draws from the global generators, which the training checkpoint restores."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int, int, int]) -> Any:
        *entropy, index = key
        if get_worker_info() is not None:
            seed = _derived_seed(*entropy)
            torch.manual_seed(seed)
            np.random.seed(seed % 2**32)
            random.seed(seed)
        return self.dataset[index]


class ResumableDataLoader(DataLoader):
    """Batches of ``batch_size`` samples of ``dataset`` in a shuffled order (the incomplete last
    batch dropped) drawn from ``(seed, epoch)``; a checkpoint records the epoch and the number of
    batches handed out in it, and a resume skips those batches without reading them.

    ``source`` is ``dataset`` itself; ``dataset`` is its wrapper that the loader reads.
    """

    def __init__(self, dataset: Dataset, batch_size: int, seed: int, num_workers: int = 0):
        self._order = _EpochOrder(len(dataset), seed)
        super().__init__(
            _WorkerSeeded(dataset),
            batch_size=batch_size,
            sampler=self._order,
            drop_last=True,
            num_workers=num_workers,
            # The workers' base seed is drawn from here, never from the global generator.
            generator=torch.Generator(),
        )
        self.source = dataset
        self._position = (0, 0)  # (epoch, batches handed out in it)
        self._resume: dict[str, int] | None = None

    def state_dict(self) -> dict[str, int]:
        epoch, batches = self._position
        return {"epoch": epoch, "batches": batches}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume = dict(state)

    def __iter__(self) -> Iterator[Any]:
        # A generator: none of this runs before the first batch is asked for, by which time
        # Lightning has called set_epoch (it calls iter() earlier, when it sets up the data).
        epoch, resume, self._resume = self._order.epoch, self._resume, None
        skip = resume["batches"] if resume is not None and resume["epoch"] == epoch else 0
        self._order.start = skip * self.batch_size
        self.generator.manual_seed(_derived_seed(self._order.seed, epoch))
        self._position = (epoch, skip)
        for batch in super().__iter__():
            self._position = (epoch, self._position[1] + 1)
            yield batch
