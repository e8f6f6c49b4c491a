"""The KL-regularised autoencoder that maps images to SD's 4-channel latents and back."""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from ldm.modules.diffusionmodules.model import Decoder, Encoder
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.util import instantiate_from_config


class AutoencoderKL(nn.Module):
    """Encoder, decoder and the 1x1 convolutions around the latent, as in the original.

    ``lossconfig`` is instantiated (``torch.nn.Identity`` in inference configs);
    ``monitor``, ``image_key`` and the other training options are accepted and stored.
    """

    def __init__(
        self,
        ddconfig: Mapping[str, Any],
        lossconfig: Mapping[str, Any] | None = None,
        embed_dim: int = 4,
        ckpt_path: str | None = None,
        ignore_keys: tuple = (),
        image_key: str = "image",
        monitor: str | None = None,
        **ignored: Any,
    ):
        super().__init__()
        if not ddconfig.get("double_z", True):
            raise ValueError("AutoencoderKL needs ddconfig.double_z = true (mean and log-variance)")
        self.image_key = image_key
        self.monitor = monitor
        self.embed_dim = embed_dim
        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        self.loss = instantiate_from_config(lossconfig) if lossconfig else nn.Identity()
        z_channels = ddconfig["z_channels"]
        self.quant_conv = nn.Conv2d(2 * z_channels, 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, 1)
        if ckpt_path is not None:
            from ldm.checkpoint import apply_state_dict, load_state_dict

            state = load_state_dict(ckpt_path)
            apply_state_dict(self, {k: v for k, v in state.items() if not k.startswith(tuple(ignore_keys))})

    @property
    def downsampling_factor(self) -> int:
        return 2 ** (self.encoder.num_resolutions - 1)

    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        return DiagonalGaussianDistribution(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x: torch.Tensor, sample_posterior: bool = True) -> tuple[torch.Tensor, DiagonalGaussianDistribution]:
        posterior = self.encode(x)
        z = posterior.sample() if sample_posterior else posterior.mode()
        return self.decode(z), posterior
