"""SD2 depth-to-image (``512-depth-ema``): the UNet reads the noisy latent and a MiDaS depth map
normalised to [-1, 1] (5 channels); the MiDaS model is part of the checkpoint (``depth_model.*``)."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from ldm.models.diffusion.finetune import LatentFinetuneDiffusion
from ldm.modules.midas.api import normalized_depth
from ldm.util import instantiate_from_config


class LatentDepth2ImageDiffusion(LatentFinetuneDiffusion):
    """The depth-to-image model; ``depth_model`` is the MiDaS estimator
    (:class:`ldm.modules.midas.api.MiDaSInference`), :meth:`depth_conditioning` makes ``c_concat``."""

    def __init__(self, depth_stage_config: Mapping[str, Any], concat_keys: Sequence[str] = ("midas_in",), *args: Any, **kwargs: Any):
        if len(concat_keys) != 1:
            raise ValueError(f"concat_keys must name the one MiDaS input, got {list(concat_keys)}")
        super().__init__(concat_keys, *args, **kwargs)
        self.depth_model = instantiate_from_config(depth_stage_config)
        self.depth_stage_key = self.concat_keys[0]

    @torch.no_grad()
    def depth_conditioning(self, image: torch.Tensor, depth: torch.Tensor | None = None) -> torch.Tensor:
        """``c_concat`` (B, 1, H/8, W/8) for an RGB ``image`` in [-1, 1] (B, 3, H, W), as the original
        demo scripts make it: MiDaS depth of the image (prepared as the original's transform does),
        resized bicubically to the latent size, then normalised per sample to [-1, 1] by its
        minimum and maximum.

        ``depth`` (B, h, w) or (B, 1, h, w), when given, replaces the MiDaS estimate (a depth map
        of the user's, any size); ``image`` then only sets the latent size. The resizing and
        normalisation are done in float32.
        """
        factor = self.first_stage_model.downsampling_factor
        size = (image.shape[-2] // factor, image.shape[-1] // factor)
        if depth is None:
            depth = self.depth_model(self.depth_model.prepare(image))
        elif depth.ndim == 3:
            depth = depth.unsqueeze(1)
        return normalized_depth(depth, size)

    def batch_conditioning(self, batch: Mapping[str, Any], z: torch.Tensor, bs: int | None) -> dict[str, Any]:
        """The depth of the batch's MiDaS input (``midas_in``: (B, 3, h, w), see
        :class:`ldm.data.util.AddMiDaS`), normalised as the original's training code does."""
        depth = self.depth_model(batch[self.depth_stage_key][:bs].to(self.device))
        return {"c_concat": [normalized_depth(depth, z.shape[2:], epsilon=0.001)]}
