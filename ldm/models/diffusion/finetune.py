"""The shared base of the SD2 models fine-tuned with extra UNet input channels (inpainting, depth)."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from ldm.models.diffusion.ddpm import LatentDiffusion

# Options of the original's LatentFinetuneDiffusion that only steer fine-tuning from a
# text-to-image checkpoint (widening its first convolution) or image logging.
FINETUNE_TRAINING_ONLY = ("finetune_keys", "keep_finetune_dims", "c_concat_log_start", "c_concat_log_end")
_ORIGINAL_FINETUNE_KEYS = ("model.diffusion_model.input_blocks.0.0.weight", "model_ema.diffusion_modelinput_blocks00weight")


class LatentFinetuneDiffusion(LatentDiffusion):
    """:class:`LatentDiffusion` whose UNet also reads ``c_concat`` maps (``conditioning_key: hybrid``):
    the noisy latent first, then the maps named by ``concat_keys``, in that order.

    The original's fine-tuning options are accepted and recorded in ``training_options``; starting
    a fine-tune from a 4-channel checkpoint (``ckpt_path`` with ``finetune_keys``) is not supported.
    """

    def __init__(self, concat_keys: Sequence[str], *args: Any, **kwargs: Any):
        finetune = {name: kwargs.pop(name) for name in FINETUNE_TRAINING_ONLY if name in kwargs}
        if finetune.get("finetune_keys", _ORIGINAL_FINETUNE_KEYS) and kwargs.get("ckpt_path"):
            raise NotImplementedError(
                "fine-tuning from a text-to-image checkpoint (ckpt_path with finetune_keys, which widens its "
                "first convolution) is not supported; set finetune_keys: null to start from a checkpoint of this family"
            )
        super().__init__(*args, **kwargs)
        self.training_options.update(finetune)
        self.concat_keys = tuple(concat_keys)

    @torch.no_grad()
    def get_input(
        self, batch: Mapping[str, Any], k: str, cond_key: str | None = None, bs: int | None = None,
        return_first_stage_outputs: bool = False,
    ) -> list:
        """``[z, {"c_concat": [maps], "c_crossattn": [c]}]`` for a data batch, as the original: the
        images under ``first_stage_key`` (``k`` is ignored, as there), the prompts under
        ``cond_stage_key``, the maps from :meth:`batch_conditioning`; with
        ``return_first_stage_outputs`` also the images, their reconstruction and the prompts."""
        z, c, x, xrec, xc = LatentDiffusion.get_input(
            self, batch, self.first_stage_key, return_first_stage_outputs=True, force_c_encode=True,
            return_original_cond=True, bs=bs,
        )
        cond = {**self.batch_conditioning(batch, z, bs), "c_crossattn": [c]}
        return [z, cond, x, xrec, xc] if return_first_stage_outputs else [z, cond]

    def batch_conditioning(self, batch: Mapping[str, Any], z: torch.Tensor, bs: int | None) -> dict[str, Any]:
        """The family's conditioning but the text (``c_concat``, maybe ``c_adm``) for a data batch
        whose first ``bs`` images have the latents ``z``."""
        raise NotImplementedError(f"{type(self).__name__} does not say how its batches condition the UNet")
