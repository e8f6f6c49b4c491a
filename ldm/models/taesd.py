"""TAESD's decoder (Ollin Boer Bohan's "tiny autoencoder for Stable Diffusion"): an approximate,
about 20x faster stand-in for the SD VAE's decoder, which takes most of a CPU generation at few
steps (25 of SD-Turbo's 34 s at 512x512 on a 2-core AVX2 CPU; TAESD's 1.2 s, BENCHMARKS.md). Opt-in (``--taesd taesd_decoder.safetensors``); its
images are the tiny decoder's approximation of the VAE's, not the VAE's.

The module is the original's ``nn.Sequential``, so its files (``taesd_decoder.safetensors`` /
``.pth``, as AUTOMATIC1111 and ComfyUI keep them) load strictly by their own keys; diffusers'
``AutoencoderTiny`` folders (``decoder.layers.*``) load too. It decodes the UNet's latents as they
are (no 1 / scale_factor) to images in [-1, 1], as ``decode_first_stage`` does.
"""

from __future__ import annotations

import os
import re

import torch
from torch import nn

from ldm.checkpoint import CheckpointError, apply_state_dict, load_state_dict

WIDTH, STAGES = 64, 3  # channels throughout; three 2x upsamplings: latents to pixels by 8


def _conv(n_in: int, n_out: int, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, bias=bias)


class Clamp(nn.Module):
    """Soft clamp of the latents to (-3, 3)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


class Block(nn.Module):
    """Three 3x3 convolutions with ReLUs, and a residual connection."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Sequential(_conv(channels, channels), nn.ReLU(), _conv(channels, channels), nn.ReLU(),
                                  _conv(channels, channels))
        self.skip = nn.Identity()
        self.fuse = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fuse(self.conv(x) + self.skip(x))


class TinyDecoder(nn.Sequential):
    """TAESD's decoder: latents (B, 4, h, w) to images (B, 3, 8h, 8w) in [-1, 1]."""

    def __init__(self, latent_channels: int = 4):
        layers: list[nn.Module] = [Clamp(), _conv(latent_channels, WIDTH), nn.ReLU()]
        for _ in range(STAGES):
            layers += [Block(WIDTH), Block(WIDTH), Block(WIDTH), nn.Upsample(scale_factor=2), _conv(WIDTH, WIDTH, bias=False)]
        layers += [Block(WIDTH), _conv(WIDTH, 3)]
        super().__init__(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return super().forward(z).mul(2).sub(1)  # TAESD's own images are in [0, 1]


def _decoder_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The decoder's tensors in the original's keys: as they are, or from diffusers' AutoencoderTiny
    (``decoder.layers.N.*``: its decoder has no Clamp module, so N + 1), its encoder left out."""
    if not any(k.startswith("decoder.layers.") for k in state):
        return state
    renamed = {}
    for key, value in state.items():
        match = re.fullmatch(r"decoder\.layers\.(\d+)\.(.+)", key)
        if match:
            renamed[f"{int(match[1]) + 1}.{match[2]}"] = value
    return renamed


def load_tiny_decoder(path: str | os.PathLike, device: torch.device | str = "cpu") -> TinyDecoder:
    """TAESD's decoder from ``path``, strictly: a file of another network is a CheckpointError saying so."""
    state = _decoder_state(load_state_dict(path))
    channels = state.get("1.weight")
    decoder = TinyDecoder(channels.shape[1] if isinstance(channels, torch.Tensor) and channels.ndim == 4 else 4)
    try:
        apply_state_dict(decoder, state)
    except CheckpointError as e:
        raise CheckpointError(
            f"{path} is not TAESD's decoder (taesd_decoder.safetensors, or a diffusers AutoencoderTiny): {e}"
        ) from None
    return decoder.to(device).eval().requires_grad_(False)
