"""The SD2 x4 upscaler: latent diffusion conditioned on the text and on the low-resolution
image, which is noised in pixel space with its own schedule and concatenated to the latent;
its noise level is the UNet's class label."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from ldm.models.diffusion.ddpm import LatentDiffusion, channels_first, repeat_to_batch
from ldm.models.diffusion.finetune import LatentFinetuneDiffusion
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
        noise_level: int | torch.Tensor | None,
        context: torch.Tensor,
        unconditional_context: torch.Tensor | None = None,
    ) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """The sampler's conditioning for upscaling ``low_res`` (B or 1, 3, h, w) in [-1, 1],
        as the original's demo (scripts/gradio/superresolution.py) builds it.

        The image, repeated to the batch of ``context`` when it is one image, is noised to
        ``noise_level`` (0 to ``low_scale_model.max_noise_level``, 350; the demo's default is 20;
        None draws one per sample) with one ``torch.randn_like`` draw of a channels-last tensor of
        its shape: the demo's image tensor is a permuted view of an (h, w, 3) array, which its
        ``.to(memory_format=torch.contiguous_format)`` leaves as it is (PyTorch sees no layout to
        change), and PyTorch fills a non-contiguous tensor with other numbers than a contiguous one. Returns ``(cond, uncond)``: ``cond`` =
        ``{"c_concat": [noised image], "c_crossattn": [context], "c_adm": noise levels}``;
        ``uncond`` the same with ``unconditional_context`` (same noised image and levels),
        or None without it. The latent to sample is (4, h, w): the VAE upsamples it 4 times.
        """
        low_res = repeat_to_batch(low_res, context.shape[0], "low-resolution images")
        low_res = low_res.to(device=self.device, dtype=torch.float32, memory_format=torch.channels_last)
        noised, levels = self.low_scale_model(low_res, noise_level)
        noised = noised.contiguous()
        cond = {"c_concat": [noised], "c_crossattn": [context], "c_adm": levels}
        if unconditional_context is None:
            return cond, None
        return cond, {"c_concat": [noised], "c_crossattn": [unconditional_context], "c_adm": levels}

    @torch.no_grad()
    def get_input(
        self, batch: Mapping[str, Any], k: str, cond_key: str | None = None, bs: int | None = None, log_mode: bool = False,
    ) -> list:
        """``[z, cond]`` for a data batch, as the original: the high-resolution images ``batch[k]``
        to latents, the prompts, and the low-resolution ones (``low_scale_key``, b h w c) noised to
        a random level each by ``low_scale_model`` (the noise in (b, 3, h, w) order: unlike the
        demo's, the original's batch tensor here is made contiguous). ``log_mode`` adds, as there, the images,
        their reconstruction, the prompts, the low-res images, their noised version and the levels."""
        out = LatentDiffusion.get_input(
            self, batch, self.first_stage_key if log_mode else k, return_first_stage_outputs=log_mode,
            force_c_encode=True, return_original_cond=log_mode, bs=bs,
        )
        x_low = channels_first(batch[self.low_scale_key][:bs]).to(self.device)
        noised, levels = self.low_scale_model(x_low)
        cond = {"c_concat": [noised], "c_crossattn": [out[1]], "c_adm": levels}
        if log_mode:
            return [out[0], cond, *out[2:], x_low, cond["c_concat"][0], cond["c_adm"]]
        return [out[0], cond]


class LatentUpscaleFinetuneDiffusion(LatentFinetuneDiffusion):
    """The original's upscaler fine-tuned from a text-to-image model: the low-resolution image
    (``concat_keys``, ``("lr",)``) joins the UNet's input, optionally cut into
    ``reshuffle_patch_size``² tiles stacked as channels, and noise-augmented by a
    ``low_scale_model`` whose levels are then ``c_adm``. No released SD2 checkpoint is of this
    class; it is here so that the original's configs and demos (which test for it) work.
    """

    def __init__(
        self,
        concat_keys: Sequence[str] = ("lr",),
        reshuffle_patch_size: int | None = None,
        low_scale_config: Mapping[str, Any] | None = None,
        low_scale_key: str | None = None,
        *args: Any,
        **kwargs: Any,
    ):
        if len(concat_keys) != 1:
            raise ValueError(f"concat_keys must name the one low-resolution input, got {list(concat_keys)}")
        if reshuffle_patch_size is not None and not (isinstance(reshuffle_patch_size, int) and reshuffle_patch_size > 0):
            raise ValueError(f"reshuffle_patch_size must be a positive int, got {reshuffle_patch_size!r}")
        if low_scale_config is not None and low_scale_key is None:
            raise ValueError("low_scale_config needs the low_scale_key of the images it augments")
        super().__init__(concat_keys, *args, **kwargs)
        self.reshuffle_patch_size = reshuffle_patch_size
        self.low_scale_key = low_scale_key
        self.low_scale_model = None if low_scale_config is None else instantiate_from_config(low_scale_config).eval()

    def reshuffle(self, x: torch.Tensor) -> torch.Tensor:
        """(b, c, p*h, p*w) to (b, p*p*c, h, w): the image's p x p tiles (of h x w pixels) stacked
        as channels, tile-row-major (the original's ``'b c (p1 h) (p2 w) -> b (p1 p2 c) h w'``)."""
        p = self.reshuffle_patch_size
        b, c, height, width = x.shape
        if height % p or width % p:
            raise ValueError(f"a {height}x{width} image does not split into {p}x{p} tiles")
        tiles = x.reshape(b, c, p, height // p, p, width // p).permute(0, 2, 4, 1, 3, 5)
        return tiles.reshape(b, p * p * c, height // p, width // p)

    def batch_conditioning(self, batch: Mapping[str, Any], z: torch.Tensor, bs: int | None) -> dict[str, Any]:
        (key,) = self.concat_keys
        x = channels_first(batch[key])
        if self.reshuffle_patch_size is not None:
            x = self.reshuffle(x)
        x = x[:bs].to(self.device)
        if self.low_scale_model is None or key != self.low_scale_key:
            return {"c_concat": [x]}
        noised, levels = self.low_scale_model(x)
        return {"c_concat": [noised], "c_adm": levels}
