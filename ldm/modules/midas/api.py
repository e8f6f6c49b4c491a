"""The MiDaS depth estimator of SD2's depth-to-image model (``depth_stage_config`` of
configs/stable-diffusion/v2-midas-inference.yaml), with the original's input transform.

Unlike the original, which read ``midas_models/dpt_hybrid-midas-501f0c75.pt`` when constructed,
nothing is read here: the weights are the ``depth_model.*`` tensors of the SD2 depth checkpoint
(or, for the ControlNet depth preprocessor, either file: :func:`load_midas`).
"""

from __future__ import annotations

import os
from typing import Any, Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ldm.checkpoint import CheckpointError, apply_state_dict, load_state_dict
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


def normalized_depth(depth: torch.Tensor, size: tuple[int, int], epsilon: float = 0.0) -> torch.Tensor:
    """``depth`` (B, 1, h, w) resized bicubically to ``size`` and mapped per sample to [-1, 1] by its
    minimum and maximum, in float32. The demos divide by the range (a constant map is an error),
    the original's training batches by the range + ``epsilon`` (0.001)."""
    depth = F.interpolate(depth.float(), size=tuple(size), mode="bicubic", align_corners=False)
    low = torch.amin(depth, dim=[1, 2, 3], keepdim=True)
    high = torch.amax(depth, dim=[1, 2, 3], keepdim=True)
    if epsilon == 0.0 and bool((high == low).any()):
        raise ValueError("the depth map is constant: it cannot be normalised to [-1, 1] (nothing to condition on)")
    return 2.0 * (depth - low) / (high - low + epsilon) - 1.0


# Where the MiDaS tensors sit in the depth model's checkpoint (512-depth-ema); MiDaS's own file
# (dpt_hybrid-midas-501f0c75.pt, the ControlNet annotators') holds them without a prefix.
DEPTH_MODEL_PREFIX = "depth_model.model."


def load_midas(path: str | os.PathLike, sizes: Mapping[str, Any] | None = None,
               device: torch.device | str = "cpu") -> MiDaSInference:
    """The MiDaS estimator of the SD2 depth checkpoint in ``path`` (its ``depth_model.*``; the rest
    is not used) or of MiDaS's own DPT-Hybrid file, strictly, in float32. ``sizes`` are the
    ``depth_stage_config`` params of the depth config (None: DPT-Hybrid's)."""
    try:
        net = midas_from_state(load_state_dict(path), sizes)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    return net.to(device=device, dtype=torch.float32).eval().requires_grad_(False)


def midas_from_state(state: Mapping[str, torch.Tensor], sizes: Mapping[str, Any] | None = None) -> MiDaSInference:
    """A MiDaS estimator holding ``state``'s tensors (as they are: no copy, meta ones included);
    see :func:`load_midas`."""
    if any(k.startswith(DEPTH_MODEL_PREFIX) for k in state):
        state = {k[len(DEPTH_MODEL_PREFIX):]: v for k, v in state.items() if k.startswith(DEPTH_MODEL_PREFIX)}
    elif not any(k.startswith("scratch.") for k in state):
        raise CheckpointError("it holds no MiDaS depth model: give the SD2 depth checkpoint (512-depth-ema), "
                              "whose depth_model.* it is, or MiDaS's dpt_hybrid-midas-501f0c75.pt")
    params = {k: v for k, v in (sizes or {}).items() if k != "model_type"}
    with torch.device("meta"):
        net = MiDaSInference(**params)
    try:
        apply_state_dict(net.model, state, assign=True)
    except CheckpointError as e:
        raise CheckpointError(f"its MiDaS does not fit DPT-Hybrid of these sizes (the depth config's depth_stage_config): {e}") from None
    return net
