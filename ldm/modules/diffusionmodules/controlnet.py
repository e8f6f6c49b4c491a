"""ControlNet (Zhang et al. 2023) in the original layout (lllyasviel/ControlNet ``cldm.cldm.ControlNet``,
the SD2.1 files of ``thibaud/controlnet-sd21``): a trainable copy of the UNet's encoder that reads a
hint image and returns one residual per skip connection plus one for the middle block, each through
a zero-initialised 1x1 convolution; the UNet adds them (``UNetModel.forward(..., control=...)``).

:class:`Control` is one ControlNet applied to a run: its hint, weight, guess mode and the part of
the schedule it acts on. Controls travel in the conditioning dict under ``c_control``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from ldm.checkpoint import CheckpointError, apply_state_dict, load_state_dict

from ldm.modules.diffusionmodules.openaimodel import TimestepEmbedSequential, UNetModel
from ldm.modules.diffusionmodules.util import zero_module

# The hint encoder: 3x3 convolutions (SiLU between), three of them with stride 2 (8x down to the
# latent), the last zero-initialised.
HINT_CHANNELS = (16, 16, 32, 32, 96, 96, 256)
HINT_STRIDES = (1, 1, 2, 1, 2, 1, 2)
GUESS_MODE_DECAY = 0.825  # guess mode: the residual of skip i (of 13) is weighted 0.825 ** (12 - i)
PREFIX = "control_model."  # the control stage's keys inside a whole ControlLDM checkpoint
TEXT_WIDTH_KEY = "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
TEXT_BASES = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL"}

logger = logging.getLogger(__name__)


class ControlNet(UNetModel):
    """The UNet's encoder (``time_embed``, ``input_blocks``, ``middle_block``: the same parameters
    and keys as the base UNet's) with ``input_hint_block``, ``zero_convs`` and ``middle_block_out``.

    Takes the base UNet's config parameters plus ``hint_channels`` (3 for an RGB hint);
    ``out_channels`` is ignored (there is no decoder).
    """

    def __init__(self, hint_channels: int = 3, **unet_params: Any):
        unet_params.pop("out_channels", None)
        super().__init__(out_channels=unet_params.get("in_channels", 4), with_decoder=False, **unet_params)
        layers: list[nn.Module] = []
        ch = hint_channels
        for out_ch, stride in zip(HINT_CHANNELS, HINT_STRIDES):
            layers += [nn.Conv2d(ch, out_ch, 3, padding=1, stride=stride), nn.SiLU()]
            ch = out_ch
        layers.append(zero_module(nn.Conv2d(ch, self.model_channels, 3, padding=1)))
        self.input_hint_block = TimestepEmbedSequential(*layers)
        *skips, middle = self.encoder_channels
        self.zero_convs = nn.ModuleList([self._zero_conv(c) for c in skips])
        self.middle_block_out = self._zero_conv(middle)

    @staticmethod
    def _zero_conv(channels: int) -> TimestepEmbedSequential:
        return TimestepEmbedSequential(zero_module(nn.Conv2d(channels, channels, 1)))

    def forward(
        self, x: torch.Tensor, hint: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """The residuals for latents ``x`` under ``hint`` (B, hint_channels, 8h, 8w, in [0, 1]):
        one per skip connection of the UNet, then the middle block's."""
        emb = self.embed_time(x, timesteps, y)
        h = x.to(emb.dtype)
        if context is not None:
            context = context.to(emb.dtype)
        guided_hint = self.input_hint_block(hint.to(emb.dtype), emb, context)
        outs = []
        for i, (module, zero_conv) in enumerate(zip(self.input_blocks, self.zero_convs)):
            h = module(h, emb, context)
            if i == 0:
                h = h + guided_hint
            outs.append(zero_conv(h, emb, context))
        h = self.middle_block(h, emb, context)
        outs.append(self.middle_block_out(h, emb, context))
        return outs


@dataclass(frozen=True)
class Control:
    """A ControlNet applied with ``hint`` (B, 3, H, W) in [0, 1] and ``weights`` (B,), one per
    batch row (0 switches it off for a row: guess mode's unconditional half), active while the
    timestep is within [``t_low``, ``t_high``]. ``guess_mode`` weights the residuals from 0.825^12
    (the shallowest skip) to 1 (the middle block), as the original's guess mode."""

    net: ControlNet
    hint: torch.Tensor
    weights: torch.Tensor
    t_low: float = 0.0
    t_high: float = float("inf")
    guess_mode: bool = False

    def concat(self, other: "Control") -> "Control":
        """One Control for the batch of ``self``'s rows then ``other``'s (the same net and window)."""
        if other.net is not self.net or (other.t_low, other.t_high, other.guess_mode) != (self.t_low, self.t_high, self.guess_mode):
            raise ValueError("only the same ControlNet, window and mode can be batched together")
        return replace(self, hint=torch.cat([self.hint, other.hint]), weights=torch.cat([self.weights, other.weights]))

    def without_guidance(self) -> "Control":
        """The same Control switched off (weights 0): guess mode's unconditional rows."""
        return replace(self, weights=torch.zeros_like(self.weights))

    def residuals(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor | None) -> list[torch.Tensor]:
        """The ControlNet's residuals, weighted per row, per skip (guess mode) and by the window;
        computed on the device without a host sync (outside the window the weight is 0)."""
        active = (t >= self.t_low) & (t <= self.t_high)
        row = (self.weights.to(t.device) * active).view(-1, 1, 1, 1)
        outs = self.net(x, self.hint.to(x.device), t, context)
        n = len(outs)
        return [
            out * (row * (GUESS_MODE_DECAY ** (n - 1 - i) if self.guess_mode else 1.0)).to(out.dtype)
            for i, out in enumerate(outs)
        ]


def control_residuals(controls: Sequence[Control], x: torch.Tensor, t: torch.Tensor, context: torch.Tensor | None) -> list[torch.Tensor]:
    """The sum of the residuals of every Control (several ControlNets add up, as in the peers)."""
    total = controls[0].residuals(x, t, context)
    for control in controls[1:]:
        total = [a + b for a, b in zip(total, control.residuals(x, t, context))]
    return total


def controlnet_params(unet_params: Mapping[str, Any], hint_channels: int = 3) -> dict[str, Any]:
    """The ControlNet of a base UNet (its config's ``unet_config.params``): the same trunk, reading
    the 4-channel noisy latent only (an inpainting UNet's extra input channels are not its)."""
    params = {k: v for k, v in dict(unet_params).items() if k not in ("out_channels", "num_classes", "adm_in_channels")}
    return {**params, "in_channels": 4, "hint_channels": hint_channels}


def controlnet_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The control stage's tensors of a file: all of them, or those under ``control_model.`` in a
    whole ControlLDM checkpoint (the rest is its base model, not used here)."""
    if any(k.startswith(PREFIX) for k in state):
        rest = sum(not k.startswith(PREFIX) for k in state)
        if rest:
            logger.info("using the %d control_model.* tensors; ignoring %d others (the ControlLDM's base model)", len(state) - rest, rest)
        return {k[len(PREFIX):]: v for k, v in state.items() if k.startswith(PREFIX)}
    return dict(state)


def load_controlnet(
    path: str | os.PathLike, unet_params: Mapping[str, Any], device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> ControlNet:
    """The ControlNet in ``path`` (original layout, with or without ``control_model.``) for a base
    UNet of ``unet_params``, strictly; converted to the native-MHA layout if the base uses it.
    A ControlNet for another base (SD 1.x's 768-wide text, SDXL) is a CheckpointError naming it."""
    from ldm.native_mha import NATIVE, ORIGINAL, convert_state_dict, detect_layout

    state = controlnet_state(load_state_dict(path))
    params = controlnet_params(unet_params)
    width = state.get(TEXT_WIDTH_KEY)
    if isinstance(width, torch.Tensor) and width.ndim == 2 and width.shape[1] != params.get("context_dim"):
        base = TEXT_BASES.get(width.shape[1], f"a {width.shape[1]}-wide text encoder")
        raise CheckpointError(f"{path} is a ControlNet for {base}; this model's text is {params.get('context_dim')} wide (SD 2.x: 1024)")
    try:
        layout = NATIVE if params.get("use_native_mha") else ORIGINAL
        if detect_layout(state) != layout:
            state = convert_state_dict(state, layout)[0]
    except Exception as e:
        raise CheckpointError(f"{path} is not a ControlNet checkpoint: {e}") from None
    with torch.device("meta"):
        net = ControlNet(**params)
    try:
        apply_state_dict(net, state, assign=True)
    except CheckpointError as e:
        raise CheckpointError(f"{path} does not fit this model's ControlNet (an SD2.1 ControlNet in the original layout): {e}") from None
    return net.to(device=device, dtype=dtype).eval().requires_grad_(False)
