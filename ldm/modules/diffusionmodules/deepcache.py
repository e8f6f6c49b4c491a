"""Step caching (DeepCache, Ma et al. 2023, arXiv:2312.00858): the UNet's deep features change
little from one denoising step to the next, so every ``interval``-th UNet call runs the whole
network and keeps the features entering its shallow output blocks, and the calls between run only
the shallow path (input blocks ``0..depth``, the last ``depth + 1`` output blocks) on those kept
features. ``depth`` 1 is DeepCache's default branch (``cache_branch_id`` 0).

:class:`StepCache` is installed as a UNet's ``forward``; each of its two steps is a module of its own
(:class:`FullStep`, :class:`ShallowStep`) so that ``--compile`` makes two graphs, neither with a
branch on data: the choice of step is made in Python from the call count, without a host sync.
Every sampler works: the count is of UNet calls (a second-order step is two).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import nn

from ldm.modules.diffusionmodules.openaimodel import UNetModel


class FullStep(nn.Module):
    """The whole UNet, also returning the deep features of ``depth`` (see :meth:`UNetModel.run`)."""

    def __init__(self, unet: UNetModel, depth: int):
        super().__init__()
        self.unet, self.depth = unet, depth

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None = None,
                y: torch.Tensor | None = None, control: Sequence[torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.unet.run(x, timesteps, context, y, control, depth=self.depth)


class ShallowStep(nn.Module):
    """The UNet's shallow path of ``depth`` on kept deep features."""

    def __init__(self, unet: UNetModel, depth: int):
        super().__init__()
        self.unet, self.depth = unet, depth

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, deep: torch.Tensor, context: torch.Tensor | None = None,
                y: torch.Tensor | None = None, control: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        return self.unet.run(x, timesteps, context, y, control, depth=self.depth, deep=deep)[0]


class StepCache:
    """A UNet's ``forward`` with step caching: call :func:`install`. Use it as a context manager
    around each sampling run (entering forgets the last run's features; leaving frees them)."""

    def __init__(self, unet: UNetModel, interval: int, depth: int = 1):
        if interval < 1:
            raise ValueError(f"cache interval {interval}: at least 1 (1: no caching)")
        if not 0 <= depth < len(unet.input_blocks):
            raise ValueError(f"cache depth {depth}: this UNet takes 0 to {len(unet.input_blocks) - 1}")
        self.interval, self.depth = interval, depth
        self.full: Callable[..., tuple[torch.Tensor, torch.Tensor]] = FullStep(unet, depth)
        self.shallow: Callable[..., torch.Tensor] = ShallowStep(unet, depth)
        self.full_calls = self.shallow_calls = 0
        self._since_full = 0
        self._deep: torch.Tensor | None = None
        self._shape: tuple[int, ...] | None = None

    def steps(self) -> tuple[nn.Module, nn.Module]:
        """The two step modules (to compile: replace :attr:`full` and :attr:`shallow` by their compiled forms)."""
        return self.full, self.shallow

    def reset(self) -> None:
        self._deep, self._shape, self._since_full = None, None, 0

    def __enter__(self) -> "StepCache":
        self.reset()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.reset()

    def __call__(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None = None,
                 y: torch.Tensor | None = None, control: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        # A full step every `interval` calls, and whenever the batch is not the one the features are of.
        if self._deep is None or self._since_full >= self.interval or tuple(x.shape) != self._shape:
            out, self._deep = self.full(x, timesteps, context, y, control)
            self._shape, self._since_full = tuple(x.shape), 1
            self.full_calls += 1
            return out
        self._since_full += 1
        self.shallow_calls += 1
        return self.shallow(x, timesteps, self._deep, context, y, control)


def install(unet: UNetModel, interval: int, depth: int = 1) -> StepCache:
    """Make ``unet`` cache its deep features (its ``forward`` becomes a :class:`StepCache`); returns it."""
    cache = StepCache(unet, interval, depth)
    unet.forward = cache
    return cache
