"""The original's data transform for the depth model: a sample's MiDaS input."""

from __future__ import annotations

import numpy as np
import torch

from ldm.modules.midas.api import load_midas_transform


class AddMiDaS:
    """Adds ``"midas_in"`` (a (3, h, w) float32 array) to a sample whose ``"jpg"`` is an (H, W, 3)
    image tensor in [-1, 1], as the original's depth2img demos and training data prepare it
    (``net_size``: :func:`~ldm.modules.midas.api.load_midas_transform`)."""

    def __init__(self, model_type: str = "dpt_hybrid", net_size: int = 384):
        self.transform = load_midas_transform(model_type, net_size)

    def pt2np(self, x: torch.Tensor) -> np.ndarray:
        return ((x + 1.0) * 0.5).detach().cpu().numpy()

    def np2pt(self, x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(x) * 2 - 1.0

    def __call__(self, sample: dict) -> dict:
        sample["midas_in"] = self.transform({"image": self.pt2np(sample["jpg"])})["image"]
        return sample
