"""The shared base of the SD2 models fine-tuned with extra UNet input channels (inpainting, depth)."""

from __future__ import annotations

from typing import Any, Sequence

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
