"""The SD2 UNet: residual blocks with timestep embedding and spatial transformers, in the
original module layout so that official checkpoints load key for key."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.attention import SpatialTransformer
from ldm.modules.diffusionmodules.util import checkpoint, normalization, timestep_embedding, zero_module


class TimestepEmbedSequential(nn.Sequential):
    """A sequence whose residual blocks take the timestep embedding and transformers the context."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class Upsample(nn.Module):
    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None):
        super().__init__()
        self.use_conv = use_conv
        if use_conv:
            self.conv = nn.Conv2d(channels, out_channels or channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None):
        super().__init__()
        if use_conv:
            self.op = nn.Conv2d(channels, out_channels or channels, 3, stride=2, padding=1)
        else:
            self.op = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with the timestep embedding added in between."""

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float,
        out_channels: int | None = None,
        use_checkpoint: bool = False,
    ):
        super().__init__()
        out_channels = out_channels or channels
        self.in_layers = nn.Sequential(normalization(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            normalization(out_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1)),
        )
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)
        self.use_checkpoint = use_checkpoint

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return checkpoint(self._forward, (x, emb), self.use_checkpoint)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class Timestep(nn.Module):
    """The sinusoidal embedding of (noise-level) timesteps as a module, as the original names it."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return timestep_embedding(t, self.dim)


class UNetModel(nn.Module):
    """Text-conditioned UNet of Stable Diffusion 2.

    Takes the official configs' parameters. ``use_fp16`` is accepted for config compatibility:
    the network computes in the dtype of its weights (``.half()`` it, or run under autocast).
    ``use_native_mha`` selects the ``nn.MultiheadAttention`` weight layout (see
    :mod:`ldm.modules.attention`).

    Class conditioning, as the SD2 families use it (the embedding is added to the timestep
    embedding; ``y`` is then required): ``num_classes: N`` embeds integer labels
    (``label_emb``, an ``nn.Embedding``: the x4 upscaler's noise level), ``num_classes:
    "sequential"`` projects an ``adm_in_channels``-wide vector through Linear-SiLU-Linear
    (``label_emb.0.{0,2}``: unCLIP's noise-augmented image embedding). Options of the original
    that no SD2 model uses (continuous labels, scale-shift norm, resblock up/down-sampling,
    1D/3D) are rejected.
    """

    def __init__(
        self,
        image_size: int,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        num_res_blocks: int | Sequence[int],
        attention_resolutions: Sequence[int],
        dropout: float = 0.0,
        channel_mult: Sequence[int] = (1, 2, 4, 8),
        conv_resample: bool = True,
        dims: int = 2,
        use_checkpoint: bool = False,
        use_fp16: bool = False,
        num_heads: int = -1,
        num_head_channels: int = -1,
        use_spatial_transformer: bool = False,
        transformer_depth: int = 1,
        context_dim: int | None = None,
        legacy: bool = True,
        disable_self_attentions: Sequence[bool] | None = None,
        num_attention_blocks: Sequence[int] | None = None,
        disable_middle_self_attn: bool = False,
        use_linear_in_transformer: bool = False,
        use_native_mha: bool = False,
        num_classes: int | None = None,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        num_heads_upsample: int = -1,
        use_new_attention_order: bool = False,
        use_bf16: bool = False,
        n_embed: int | None = None,
        adm_in_channels: int | None = None,
        with_decoder: bool = True,
    ):
        super().__init__()
        unsupported = {
            f"num_classes={num_classes!r}": not (num_classes is None or num_classes == "sequential" or _is_int(num_classes)),
            "adm_in_channels without num_classes='sequential'": adm_in_channels is not None and num_classes != "sequential",
            "use_scale_shift_norm": use_scale_shift_norm,
            "resblock_updown": resblock_updown,
            "n_embed": n_embed is not None,
            "dims != 2": dims != 2,
            "use_spatial_transformer=False": not use_spatial_transformer,
        }
        if any(unsupported.values()):
            names = ", ".join(k for k, v in unsupported.items() if v)
            raise ValueError(f"UNetModel options not used by Stable Diffusion 2 are not supported: {names}")
        if context_dim is None:
            raise ValueError("use_spatial_transformer needs context_dim")
        if num_classes == "sequential" and adm_in_channels is None:
            raise ValueError("num_classes='sequential' needs adm_in_channels (the width of the class-label vector)")
        if num_heads == -1 and num_head_channels == -1:
            raise ValueError("set num_heads or num_head_channels")
        if isinstance(num_res_blocks, int):
            num_res_blocks = [num_res_blocks] * len(channel_mult)
        if len(num_res_blocks) != len(channel_mult):
            raise ValueError("num_res_blocks needs one entry per channel_mult level")

        self.image_size = image_size
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_res_blocks = list(num_res_blocks)
        self.channel_mult = list(channel_mult)
        self.use_fp16 = use_fp16
        self.num_classes = num_classes

        def heads_and_dim(ch: int) -> tuple[int, int]:
            if num_head_channels == -1:
                heads, dim_head = num_heads, ch // num_heads
            else:
                heads, dim_head = ch // num_head_channels, num_head_channels
            if legacy:
                dim_head = ch // heads
            return heads, dim_head

        def transformer(ch: int, disable_self_attn: bool) -> SpatialTransformer:
            heads, dim_head = heads_and_dim(ch)
            return SpatialTransformer(
                ch,
                heads,
                dim_head,
                depth=transformer_depth,
                context_dim=context_dim,
                disable_self_attn=disable_self_attn,
                use_linear=use_linear_in_transformer,
                use_checkpoint=use_checkpoint,
                use_native_mha=use_native_mha,
            )

        def resblock(ch: int, out_ch: int | None = None) -> ResBlock:
            return ResBlock(ch, time_embed_dim, dropout, out_channels=out_ch, use_checkpoint=use_checkpoint)

        def has_attention(level: int, block: int) -> bool:
            return num_attention_blocks is None or block < num_attention_blocks[level]

        def self_attn_disabled(level: int) -> bool:
            return bool(disable_self_attentions[level]) if disable_self_attentions is not None else False

        time_embed_dim = model_channels * 4
        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, time_embed_dim), nn.SiLU(), nn.Linear(time_embed_dim, time_embed_dim)
        )

        if num_classes == "sequential":
            self.label_emb = nn.Sequential(
                nn.Sequential(
                    nn.Linear(adm_in_channels, time_embed_dim), nn.SiLU(), nn.Linear(time_embed_dim, time_embed_dim)
                )
            )
        elif num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, time_embed_dim)

        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(nn.Conv2d(in_channels, model_channels, 3, padding=1))]
        )
        input_block_chans = [model_channels]
        ch = model_channels
        ds = 1
        for level, mult in enumerate(channel_mult):
            for nr in range(self.num_res_blocks[level]):
                layers: list[nn.Module] = [resblock(ch, mult * model_channels)]
                ch = mult * model_channels
                if ds in attention_resolutions and has_attention(level, nr):
                    layers.append(transformer(ch, self_attn_disabled(level)))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                input_block_chans.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch, conv_resample)))
                input_block_chans.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(
            resblock(ch), transformer(ch, disable_middle_self_attn), resblock(ch)
        )

        self.encoder_channels = list(input_block_chans) + [ch]  # what each skip and the middle block put out
        if not with_decoder:  # a ControlNet's trunk (ldm.modules.diffusionmodules.controlnet)
            return
        self.output_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(self.num_res_blocks[level] + 1):
                skip_ch = input_block_chans.pop()
                layers = [resblock(ch + skip_ch, model_channels * mult)]
                ch = model_channels * mult
                if ds in attention_resolutions and has_attention(level, i):
                    layers.append(transformer(ch, self_attn_disabled(level)))
                if level and i == self.num_res_blocks[level]:
                    layers.append(Upsample(ch, conv_resample))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            normalization(ch), nn.SiLU(), zero_module(nn.Conv2d(model_channels, out_channels, 3, padding=1))
        )

    @property
    def downsampling_factor(self) -> int:
        """How many times smaller the deepest feature map is than the input latent."""
        return 2 ** (len(self.channel_mult) - 1)

    def embed_time(self, x: torch.Tensor, timesteps: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """The timestep embedding, plus the class labels' for a class-conditional UNet."""
        if (y is None) != (self.num_classes is None):
            raise ValueError(
                f"class labels y are needed if and only if the UNet is class-conditional (num_classes={self.num_classes!r})"
            )
        dtype = self.time_embed[0].weight.dtype
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(dtype))
        if y is not None:
            if y.shape[0] != x.shape[0]:
                raise ValueError(f"y has batch size {y.shape[0]}, x has {x.shape[0]}")
            emb = emb + self.label_emb(y.to(dtype) if y.is_floating_point() else y)
        return emb

    def forward(
        self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None = None, y: torch.Tensor | None = None,
        control: Sequence[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Predict the noise (or v) for latents ``x`` at ``timesteps`` given the text ``context``
        and, for a class-conditional UNet, the labels ``y`` (integers, or vectors for "sequential").

        ``control``: residuals from ControlNets, one per skip connection and one for the middle
        block (the last), added where the original's ``ControlledUnetModel`` adds them."""
        return self.run(x, timesteps, context, y, control)[0]

    def run(
        self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None = None, y: torch.Tensor | None = None,
        control: Sequence[torch.Tensor] | None = None, depth: int | None = None, deep: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:meth:`forward`, and for step caching (DeepCache, :mod:`ldm.modules.diffusionmodules.deepcache`)
        the deep features: with ``depth`` d, also returns the features entering output block
        ``-(d + 1)``; given those as ``deep``, runs only the shallow path, input blocks ``0..d`` and
        the last ``d + 1`` output blocks, on the skip connections of that depth."""
        if control is not None and len(control) != len(self.input_blocks) + 1:
            raise ValueError(f"control holds {len(control)} residuals; this UNet takes {len(self.input_blocks) + 1}")
        shallow = deep is not None
        if shallow and depth is None:
            raise ValueError("deep features need the depth they were kept at")
        emb = self.embed_time(x, timesteps, y)
        dtype = emb.dtype
        h = x.to(dtype)
        if context is not None:
            context = context.to(dtype)
        kept_at = None if depth is None else len(self.output_blocks) - depth - 1
        skips = []
        for module in self.input_blocks[: depth + 1] if shallow else self.input_blocks:
            h = module(h, emb, context)
            skips.append(h)
        if control is not None:
            skips = [skip + residual for skip, residual in zip(skips, control)]
        if shallow:
            h, first = deep, kept_at
        else:
            h, first = self.middle_block(h, emb, context), 0
            if control is not None:
                h = h + control[-1]
        kept = None
        for i, module in enumerate(self.output_blocks[first:], first):
            if i == kept_at:
                kept = h
            h = module(torch.cat([h, skips.pop()], dim=1), emb, context)
        return self.out(h).to(x.dtype), kept


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
