"""LoRA fine-tuning: the model's weights stay frozen and low-rank updates of the UNet's attention
projections learn, exported as a kohya-format file (``lora_unet_*``) that every peer, and
``--lora``, loads."""

from __future__ import annotations

import math
import os
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from ldm.checkpoint import apply_state_dict, load_state_dict
from ldm.lora import unet_targets
from ldm.training.diffusion import LatentDiffusionTrainer

DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # the attention projections, as kohya-ss trains by default


class LoraLinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable update ``alpha / rank * up(down(x))``; ``up`` starts
    at zero, so training starts from the base model."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base
        self.lora_down = nn.Linear(base.in_features, rank, bias=False)
        self.lora_up = nn.Linear(rank, base.out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)
        self.alpha = alpha
        self.scale = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scale * self.lora_up(self.lora_down(x))


def add_lora(unet: nn.Module, rank: int, alpha: float, targets: Sequence[str] = DEFAULT_TARGETS) -> dict[str, LoraLinear]:
    """Wrap the UNet's linear layers whose names end with one of ``targets`` in :class:`LoraLinear`;
    returns them by kohya name (``lora_unet_`` + the diffusers module name, dots as underscores)."""
    names = {id(t.module): name for name, t in unet_targets(unet).items() if t.rows is None}
    wrapped = {}
    for name, module in list(unet.named_modules()):
        if isinstance(module, nn.Linear) and name.endswith(tuple(targets)):
            if id(module) not in names:
                raise ValueError(f"{name}: no diffusers name to export it under")
            parent, _, leaf = name.rpartition(".")
            lora = LoraLinear(module, rank, alpha)
            setattr(unet.get_submodule(parent), leaf, lora)
            wrapped["lora_unet_" + names[id(module)].replace(".", "_")] = lora
    if not wrapped:
        raise ValueError(f"no linear layer of the UNet ends with {list(targets)} (a native-MHA config? train on the original layout)")
    return wrapped


class LoraTrainer(LatentDiffusionTrainer):
    """Trains a LoRA of the UNet of ``base_ckpt`` (a whole model, loaded strictly into
    ``ldm_config``'s architecture): rank ``rank``, scale ``alpha / rank``, on the linear layers
    named by ``targets``. Everything else as :class:`LatentDiffusionTrainer` (caption dropout,
    caches); no EMA. :meth:`export_state_dict` is the kohya-format LoRA."""

    keeps_ema = False

    def __init__(
        self,
        ldm_config: Mapping[str, Any] | str | os.PathLike,
        base_ckpt: str,
        rank: int = 4,
        alpha: float = 4.0,
        targets: Sequence[str] = DEFAULT_TARGETS,
        learning_rate: float = 1e-4,
        ucg_rate: float = 0.1,
        image_key: str = "image",
        caption_key: str = "caption",
    ):
        if rank < 1:
            raise ValueError(f"rank must be at least 1, got {rank}")
        super().__init__(ldm_config, base_ckpt, learning_rate, ucg_rate, image_key=image_key, caption_key=caption_key)
        apply_state_dict(self.model, load_state_dict(base_ckpt))
        self.model.requires_grad_(False)
        self.loras = add_lora(self.model.model.diffusion_model, rank, float(alpha), targets)
        for lora in self.loras.values():
            lora.lora_down.requires_grad_(True)
            lora.lora_up.requires_grad_(True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for lora in self.loras.values() for p in (lora.lora_down.weight, lora.lora_up.weight)]
        return torch.optim.AdamW(params, lr=self.learning_rate, weight_decay=0.0)

    def export_state_dict(self) -> dict[str, torch.Tensor]:
        """The LoRA in kohya's format: ``<name>.lora_down.weight``, ``.lora_up.weight``, ``.alpha``."""
        out = {}
        for name, lora in self.loras.items():
            out[f"{name}.lora_down.weight"] = lora.lora_down.weight.detach().clone()
            out[f"{name}.lora_up.weight"] = lora.lora_up.weight.detach().clone()
            out[f"{name}.alpha"] = torch.tensor(lora.alpha)
        return out
