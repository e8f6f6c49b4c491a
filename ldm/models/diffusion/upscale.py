"""The SD2 x4 upscaler: latent diffusion conditioned on the text and on the low-resolution
image, which is noised in pixel space with its own schedule and concatenated to the latent;
its noise level is the UNet's class label."""

from __future__ import annotations

from typing import Any, Mapping

import torch

from ldm.models.diffusion.ddpm import LatentDiffusion, repeat_to_batch
from ldm.util import instantiate_from_config


class LatentUpscaleDiffusion(LatentDiffusion):
    """``LatentDiffusion`` with the original's ``low_scale_model`` (an
    :class:`~ldm.modules.diffusionmodules.upscaling.ImageConcatWithNoiseAugmentation`), whose
    schedule buffers are checkpoint keys. ``low_scale_key`` (the training data's key) is kept;
    ``noise_level_key`` was never implemented by the original and is refused.
    """

    def __init__(
        self,
        *args: Any,
        low_scale_config: Mapping[str, Any],
        low_scale_key: str = "LR",
        noise_level_key: str | None = None,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        if self.cond_stage_trainable:
            raise ValueError("LatentUpscaleDiffusion needs a frozen text encoder (cond_stage_trainable: false)")
        if noise_level_key is not None:
            raise NotImplementedError("noise_level_key (noise levels from the data) is not implemented, as in the original")
        self.low_scale_model = instantiate_from_config(low_scale_config).eval()
        self.low_scale_key = low_scale_key

    @torch.no_grad()
    def upscale_conditioning(
        self,
        low_res: torch.Tensor,
        noise_level: int | torch.Tensor,
        context: torch.Tensor,
        unconditional_context: torch.Tensor | None = None,
    ) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """The sampler's conditioning for upscaling ``low_res`` (B or 1, 3, h, w) in [-1, 1],
        as the original's demo (scripts/gradio/superresolution.py) builds it.

        The image, repeated to the batch of ``context`` when it is one image, is noised to
        ``noise_level`` (0 to ``low_scale_model.max_noise_level``, 350; the demo's default is 20)
        with one ``torch.randn_like`` draw of its shape. Returns ``(cond, uncond)``: ``cond`` =
        ``{"c_concat": [noised image], "c_crossattn": [context], "c_adm": noise levels}``;
        ``uncond`` the same with ``unconditional_context`` (same noised image and levels),
        or None without it. The latent to sample is (4, h, w): the VAE upsamples it 4 times.
        """
        low_res = repeat_to_batch(low_res, context.shape[0], "low-resolution images")
        low_res = low_res.to(device=self.device, dtype=torch.float32, memory_format=torch.contiguous_format)
        noised, levels = self.low_scale_model(low_res, noise_level)
        cond = {"c_concat": [noised], "c_crossattn": [context], "c_adm": levels}
        if unconditional_context is None:
            return cond, None
        return cond, {"c_concat": [noised], "c_crossattn": [unconditional_context], "c_adm": levels}
