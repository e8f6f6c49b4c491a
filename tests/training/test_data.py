"""The training loader (``ldm.training.data``): an order drawn from (seed, epoch), the same
for every loader of that seed, and a position inside the epoch that a new loader resumes from
exactly, worker processes' random draws included."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from ldm.training.data import ResumableDataLoader


class RandomDraws(Dataset):
    """Sample ``i``: ``i`` and one draw from each global generator, as an augmentation makes."""

    def __len__(self) -> int:
        return 10

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.tensor([i, torch.rand(()).item(), np.random.rand(), random.random()], dtype=torch.float64)


def epoch(loader: ResumableDataLoader, number: int) -> list[torch.Tensor]:
    loader.sampler.set_epoch(number)  # as Lightning's fit loop does at each epoch start
    return list(loader)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_new_loader_resumes_inside_an_epoch_exactly(workers):
    whole = epoch(ResumableDataLoader(RandomDraws(), batch_size=3, seed=7, num_workers=workers), 1)
    first = ResumableDataLoader(RandomDraws(), batch_size=3, seed=7, num_workers=workers)
    first.sampler.set_epoch(1)
    batches = iter(first)
    taken = [next(batches)]
    state = first.state_dict()
    assert state == {"epoch": 1, "batches": 1}
    resumed = ResumableDataLoader(RandomDraws(), batch_size=3, seed=7, num_workers=workers)
    resumed.load_state_dict(state)
    rest = epoch(resumed, 1)
    assert len(whole) == len(resumed) == 3  # 10 samples, the incomplete last batch dropped
    columns = slice(None) if workers else 0  # in the main process the draws are the global streams'
    # Both sides run the same code on the same data: bit-for-bit equality is the expected result.
    for got, want in zip(taken + rest, whole, strict=True):
        assert torch.equal(got[:, columns], want[:, columns])
    assert resumed.state_dict() == {"epoch": 1, "batches": 3}


def test_order_depends_on_seed_and_epoch_only():
    def order(seed: int, number: int) -> list[int]:
        loader = ResumableDataLoader(RandomDraws(), batch_size=2, seed=seed)
        return torch.cat(epoch(loader, number))[:, 0].int().tolist()

    torch.manual_seed(1)
    first = order(7, 0)
    torch.manual_seed(2)  # the global generators do not choose the order
    assert order(7, 0) == first
    assert len({tuple(order(7, 0)), tuple(order(7, 1)), tuple(order(8, 0))}) == 3
    assert sorted(order(7, 3)) == list(range(10))


def test_a_state_of_another_epoch_starts_that_epoch_afresh():
    loader = ResumableDataLoader(RandomDraws(), batch_size=2, seed=7)
    loader.load_state_dict({"epoch": 0, "batches": 5})  # the end of epoch 0: Lightning moves on to epoch 1
    assert len(epoch(loader, 1)) == 5
