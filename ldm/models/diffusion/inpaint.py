"""SD2 inpainting (``512-inpainting-ema``): the UNet reads the noisy latent, the mask and the
latent of the masked image (9 channels)."""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F

from ldm.models.diffusion.finetune import LatentFinetuneDiffusion


class LatentInpaintDiffusion(LatentFinetuneDiffusion):
    """The inpainting model; :meth:`inpaint_conditioning` makes its ``c_concat``."""

    def __init__(
        self,
        concat_keys: Sequence[str] = ("mask", "masked_image"),
        masked_image_key: str = "masked_image",
        *args: Any,
        **kwargs: Any,
    ):
        if masked_image_key not in concat_keys or len(concat_keys) != 2:
            raise ValueError(
                f"concat_keys must name the mask and the masked image ({masked_image_key!r}), got {list(concat_keys)}"
            )
        super().__init__(concat_keys, *args, **kwargs)
        self.masked_image_key = masked_image_key

    @torch.no_grad()
    def inpaint_conditioning(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``c_concat`` for an RGB ``image`` in [-1, 1] (B, 3, H, W) and a ``mask`` in [0, 1]
        (B, 1, H, W) whose 1 marks what to repaint, as the original demo scripts make it.

        The mask is binarised at 0.5; the masked image (``image * (mask < 0.5)``) is encoded
        and its posterior *sampled* (one normal draw of the latent's shape from the global
        generator), times ``scale_factor``; the mask is resized to the latent size by nearest
        interpolation. Returned in ``concat_keys`` order (mask, then masked-image latent):
        the UNet's input is then [noisy latent, mask, masked-image latent].
        """
        mask = (mask >= 0.5).float()
        masked_image = image.float() * (mask < 0.5)
        weight = self.first_stage_model.quant_conv.weight
        latent = self.get_first_stage_encoding(self.encode_first_stage(masked_image.to(weight.dtype)))
        maps = {self.masked_image_key: latent}
        for key in self.concat_keys:
            if key != self.masked_image_key:
                maps[key] = F.interpolate(mask, size=latent.shape[-2:])
        return torch.cat([maps[key] for key in self.concat_keys], dim=1)
