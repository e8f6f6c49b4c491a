"""SD2 inpainting (``512-inpainting-ema``): the UNet reads the noisy latent, the mask and the
latent of the masked image (9 channels)."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F

from ldm.models.diffusion.ddpm import channels_first
from ldm.models.diffusion.finetune import LatentFinetuneDiffusion


class LatentInpaintDiffusion(LatentFinetuneDiffusion):
    """The inpainting model; :meth:`inpaint_conditioning` makes its ``c_concat`` from an image and a
    mask, :meth:`concat_conditioning` from the original's batch maps (``mask``, ``masked_image``)."""

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
        (B, 1, H, W) whose 1 marks what to repaint, as the original demo scripts make it: the mask
        binarised at 0.5 and the masked image ``image * (mask < 0.5)``, then :meth:`concat_conditioning`.
        """
        mask = (mask >= 0.5).float()
        maps = {key: mask for key in self.concat_keys}
        maps[self.masked_image_key] = image.float() * (mask < 0.5)
        return self.concat_conditioning(maps)

    @torch.no_grad()
    def concat_conditioning(self, maps: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``c_concat`` from the maps named by ``concat_keys`` (B, C, H, W), as the original builds it:
        the masked image is encoded and its posterior *sampled* (one normal draw of the latent's shape
        from the global generator), times ``scale_factor``; the mask is resized to the latent size by
        nearest interpolation. Joined in ``concat_keys`` order (mask, then masked-image latent): the
        UNet's input is then [noisy latent, mask, masked-image latent].
        """
        weight = self.first_stage_model.quant_conv.weight
        latent = self.get_first_stage_encoding(self.encode_first_stage(maps[self.masked_image_key].to(weight.dtype)))
        return torch.cat([
            latent if key == self.masked_image_key else F.interpolate(maps[key].float(), size=latent.shape[-2:])
            for key in self.concat_keys
        ], dim=1)

    def batch_conditioning(self, batch: Mapping[str, Any], z: torch.Tensor, bs: int | None) -> dict[str, Any]:
        maps = {key: channels_first(batch[key])[:bs].to(self.device) for key in self.concat_keys}
        return {"c_concat": [self.concat_conditioning(maps)]}
