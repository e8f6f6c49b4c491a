"""Build a model from its config and fill it from a checkpoint, without random initialisation."""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from ldm.checkpoint import CheckpointError, apply_state_dict, load_state_dict
from ldm.util import instantiate_from_config

logger = logging.getLogger(__name__)


def load_config(config: str | os.PathLike | DictConfig | dict) -> DictConfig:
    """An OmegaConf config from a YAML path or a mapping; a clear error for a missing file."""
    if isinstance(config, (str, os.PathLike)):
        if not os.path.isfile(config):
            raise FileNotFoundError(f"config not found: {config}")
        return OmegaConf.load(config)
    return OmegaConf.create(config) if isinstance(config, dict) else config


def build_model(config: Any, device: str | torch.device = "meta") -> nn.Module:
    """Instantiate ``config.model``; on ``meta`` this allocates and initialises nothing."""
    config = load_config(config)
    with torch.device(device):
        return instantiate_from_config(config.model)


def load_model_from_config(
    config: Any,
    ckpt: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    strict: bool = True,
) -> nn.Module:
    """The model of ``config`` with the weights of ``ckpt``, on ``device`` in eval mode,
    its modules in ``dtype`` (the noise schedule stays float32).

    The model is built on the meta device and the checkpoint's tensors are assigned to it,
    so loading costs about as much as reading the file. Loading is strict: a mismatch raises
    :class:`~ldm.checkpoint.CheckpointError` naming the likely cause.
    """
    device = torch.device(device)
    config = load_config(config)
    state = load_state_dict(ckpt, device="cpu", config=config)
    model = build_model(config, "meta")
    try:
        apply_state_dict(model, state, strict=strict, assign=True)
    except CheckpointError as e:
        raise CheckpointError(f"{ckpt}: {e}") from None
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise CheckpointError(f"{ckpt}: these tensors were not filled from the checkpoint: {left[:8]}")
    model.to(device=device)
    # Weights take ``dtype``. Noise schedules are float32 whatever the file stores, as the
    # original's float32 buffers hold what it loads into them: the root's own buffers (the
    # sampler constants derive from them) and those of modules that say so (the conditioning
    # noise augmentations); they are taken before the cast, so nothing is rounded.
    kept = {
        name: buffer
        for name, buffer in model.named_buffers()
        if buffer.is_floating_point()
        and ("." not in name or getattr(model.get_submodule(name.rpartition(".")[0]), "keeps_float32_buffers", False))
    }
    for child in model.children():
        child.to(dtype=dtype)
    for name, buffer in kept.items():
        owner, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(owner), leaf, buffer.float())
    return model.eval()
