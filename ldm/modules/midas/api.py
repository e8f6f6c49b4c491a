"""The MiDaS depth estimator of SD2's depth-to-image model (``depth_stage_config`` of
configs/stable-diffusion/v2-midas-inference.yaml), with the original's input transform.

Unlike the original, which read ``midas_models/dpt_hybrid-midas-501f0c75.pt`` when constructed,
nothing is read here: the weights are the ``depth_model.*`` tensors of the SD2 depth checkpoint.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.midas.dpt import DPTDepthModel

# MiDaS sizes its input to a multiple of this (the backbone's stride 16, and the 1/32 DPT level).
MULTIPLE_OF = 32


def midas_input_size(height: int, width: int, net_size: int = 384) -> tuple[int, int]:
    """The size MiDaS sees an image at: the original transform's ``Resize(net_size, net_size,
    keep_aspect_ratio=True, ensure_multiple_of=32, resize_method="minimal")`` — one scale for
    both sides, whichever of the two side scales is nearer to 1, then each side rounded (half to
    even, as NumPy) to a multiple of 32."""
    scale_h, scale_w = net_size / height, net_size / width
    scale = scale_w if abs(1 - scale_w) < abs(1 - scale_h) else scale_h
    return (round(scale * height / MULTIPLE_OF) * MULTIPLE_OF, round(scale * width / MULTIPLE_OF) * MULTIPLE_OF)


def midas_transform(image: torch.Tensor, net_size: int = 384) -> torch.Tensor:
    """The original's MiDaS transform of an RGB ``image`` in [0, 1] (B, 3, H, W): resized
    bicubically to :func:`midas_input_size`, normalised with mean = std = 0.5; float32.

    The original resized with OpenCV's INTER_CUBIC; PyTorch's bicubic uses the same kernel
    (Keys, a = -0.75), pixel-centre alignment and replicated borders, without antialiasing.
    It runs in float64 because OpenCV computes the source coordinates in double: PyTorch's
    float32 coordinates would shift the far side by up to ~4e-5 pixel.
    """
    size = midas_input_size(image.shape[-2], image.shape[-1], net_size)
    x = image.float()
    if tuple(x.shape[-2:]) != size:
        x = F.interpolate(x.double(), size=size, mode="bicubic", align_corners=False).float()
    return (x - 0.5) / 0.5


def load_midas_transform(model_type: str = "dpt_hybrid", net_size: int = 384) -> Callable[[dict], dict]:
    """The original's transform for a sample ``{"image": (H, W, 3) array in [0, 1]}``: the same
    dict with ``"image"`` the MiDaS input, a (3, h, w) float32 array (:func:`midas_transform`).
    ``net_size`` is the size the MiDaS network was trained at (SD2's: 384)."""
    if model_type not in MiDaSInference.MODEL_TYPES:
        raise ValueError(f"MiDaS model_type {model_type!r} is not used by SD2; the depth model is 'dpt_hybrid'")

    def transform(sample: dict) -> dict:
        image = torch.from_numpy(np.ascontiguousarray(sample["image"])).permute(2, 0, 1)[None]
        return {**sample, "image": midas_transform(image, net_size)[0].numpy()}

    return transform


class MiDaSInference(nn.Module):
    """MiDaS DPT-Hybrid (``model``, a :class:`~ldm.modules.midas.dpt.DPTDepthModel`).

    Only ``model_type="dpt_hybrid"`` exists for SD2; ``sizes`` (``features`` and the backbone's, see
    :func:`~ldm.modules.midas.dpt.hybrid_vit`) default to it, and the tiny test models shrink them.
    """

    MODEL_TYPES = ("dpt_hybrid",)

    def __init__(self, model_type: str = "dpt_hybrid", **sizes: Any):
        super().__init__()
        if model_type not in self.MODEL_TYPES:
            raise ValueError(f"MiDaS model_type {model_type!r} is not used by SD2; the depth model is 'dpt_hybrid'")
        self.model = DPTDepthModel(**sizes)

    def prepare(self, image: torch.Tensor) -> torch.Tensor:
        """The original demo's MiDaS input for an RGB ``image`` in [-1, 1] (B, 3, H, W):
        :func:`midas_transform` of it in [0, 1]."""
        return midas_transform((image.float() + 1.0) * 0.5, self.model.image_size)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Relative inverse depth (B, 1, H, W) of a prepared input ``x`` (see :meth:`prepare`),
        computed in the weights' dtype."""
        weight = self.model.scratch.layer1_rn.weight
        prediction = self.model(x.to(weight.dtype)).unsqueeze(1)
        if prediction.shape[-2:] != x.shape[-2:]:
            prediction = F.interpolate(prediction, size=x.shape[-2:], mode="bicubic", align_corners=False)
        return prediction
