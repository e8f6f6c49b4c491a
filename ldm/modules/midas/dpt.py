"""DPT-Hybrid (Ranftl et al. 2021, "Vision Transformers for Dense Prediction"), the MiDaS depth
network SD2's depth model conditions on, in the module layout of the original code so that the
``depth_model.model.*`` tensors of the released checkpoint load strictly.

The backbone is timm's R50+ViT-B/16 hybrid (``vit_base_resnet50_384``), built with timm and never
pretrained here: its weights come from the SD2 checkpoint. The rest is the DPT neck and head:

* reassemble: tokens after ViT blocks 8 and 11 lose their readout (class) token by projection
  (concatenate it to every token, ``Linear(2C, C)`` + GELU), become a 1/16 feature map, and take a
  1x1 convolution (block 11's also a stride-2 3x3 one, to 1/32); the ResNet's first two stages
  (1/4 and 1/8) are used as they are;
* fusion (``scratch``): a 3x3 convolution per level to ``features`` channels, then from the
  coarsest level up, residual conv units, x2 bilinear upsampling (align_corners) and a 1x1 conv;
* head: conv, x2 upsampling, conv, ReLU, 1x1 conv, ReLU (non-negative inverse depth).

Unlike the original, the intermediate activations are returned by the forward pass, not caught
by forward hooks in a module-global dict, and the final LayerNorm (whose output DPT never uses)
is not evaluated.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

# ViT blocks whose outputs feed the two coarsest DPT levels (the hybrid's hooks are [0, 1, 8, 11];
# the first two are unused: those levels come from the ResNet stages).
READOUT_BLOCKS = (8, 11)
VIT_DEPTH = 12
PATCH = 16  # the backbone's total stride: one token per 16x16 pixels


def hybrid_vit(
    image_size: int = 384,
    embed_dim: int = 768,
    num_heads: int = 12,
    backbone_layers: Sequence[int] = (3, 4, 9),
    backbone_channels: Sequence[int] = (256, 512, 1024),
    stem_channels: int = 64,
) -> nn.Module:
    """timm's R50+ViT-B/16 hybrid; the defaults build exactly ``timm.create_model("vit_base_resnet50_384")``
    (ResNetV2 without pre-activation, weight-standardised 'SAME' convolutions, GroupNorm).

    ``image_size``: the input size of training (position embeddings for (size/16)^2 tokens, and the
    size MiDaS resizes images to); ``embed_dim``, ``num_heads``: the 12 ViT blocks; ``backbone_layers``,
    ``backbone_channels``, ``stem_channels``: the ResNet's bottlenecks per stage and widths.
    """
    # timm is imported here: only the depth model needs it, and importing it takes seconds.
    from timm.layers import HybridEmbed, StdConv2dSame
    from timm.models.resnetv2 import ResNetV2
    from timm.models.vision_transformer import VisionTransformer

    backbone = ResNetV2(
        layers=tuple(backbone_layers), channels=tuple(backbone_channels), stem_chs=stem_channels,
        num_classes=0, global_pool="", preact=False, stem_type="same", conv_layer=partial(StdConv2dSame, eps=1e-8),
    )
    embed = partial(HybridEmbed, backbone=backbone)
    return VisionTransformer(
        img_size=image_size, patch_size=1, embed_dim=embed_dim, depth=VIT_DEPTH, num_heads=num_heads, embed_layer=embed,
    )


class ProjectReadout(nn.Module):
    """Fold the readout (class) token into the others: concatenate it to each, project back to C."""

    def __init__(self, dim: int):
        super().__init__()
        self.project = nn.Sequential(nn.Linear(2 * dim, dim), nn.GELU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x[:, 1:]
        return self.project(torch.cat([tokens, x[:, :1].expand_as(tokens)], dim=-1))


class Reassemble(nn.Sequential):
    """Tokens to a feature map: readout projection, then the convolutions.

    Entries 1 and 2 hold the places of the original's transpose and (fixed 384-pixel) unflatten,
    so that the convolutions keep their checkpoint names (``act_postprocess3.3.weight``); the
    reshaping itself is done in :meth:`forward`, for any input size.
    """

    def __init__(self, dim: int, out_channels: int, downsample: bool):
        layers = [ProjectReadout(dim), nn.Identity(), nn.Identity(), nn.Conv2d(dim, out_channels, 1)]
        if downsample:
            layers.append(nn.Conv2d(out_channels, out_channels, 3, stride=2, padding=1))
        super().__init__(*layers)

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        x = self[0](tokens).transpose(1, 2).unflatten(2, grid)
        for conv in list(self)[3:]:
            x = conv(x)
        return x


class HybridBackbone(nn.Module):
    """The hybrid ViT (``model``) and the reassembly of its two token levels (``act_postprocess3/4``)."""

    def __init__(self, vit: nn.Module, features: Sequence[int]):
        super().__init__()
        self.model = vit
        dim = vit.embed_dim
        self.act_postprocess3 = Reassemble(dim, features[2], downsample=False)
        self.act_postprocess4 = Reassemble(dim, features[3], downsample=True)

    def position_embedding(self, grid: tuple[int, int]) -> torch.Tensor:
        """The position embedding for a ``grid`` of tokens: the trained one, bilinearly resized
        (as the original) when the input is not the training size."""
        pos = self.model.pos_embed
        old = int(round((pos.shape[1] - 1) ** 0.5))
        if (old, old) == tuple(grid):
            return pos
        grid_pos = pos[0, 1:].reshape(1, old, old, -1).permute(0, 3, 1, 2)
        grid_pos = F.interpolate(grid_pos, size=grid, mode="bilinear", align_corners=False)
        return torch.cat([pos[:, :1], grid_pos.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1)], dim=1)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The four DPT levels (1/4, 1/8, 1/16, 1/32 of the input) of an image ``x`` whose sides
        are multiples of 32."""
        vit = self.model
        grid = (x.shape[-2] // PATCH, x.shape[-1] // PATCH)
        resnet = vit.patch_embed.backbone
        h = resnet.stem(x)
        layer_1 = resnet.stages[0](h)
        layer_2 = resnet.stages[1](layer_1)
        h = resnet.norm(resnet.stages[2](layer_2))
        tokens = vit.patch_embed.proj(h).flatten(2).transpose(1, 2)
        tokens = torch.cat([vit.cls_token.expand(x.shape[0], -1, -1), tokens], dim=1)
        tokens = vit.pos_drop(tokens + self.position_embedding(grid))
        taps = {}
        for i, block in enumerate(vit.blocks[: READOUT_BLOCKS[-1] + 1]):
            tokens = block(tokens)
            if i in READOUT_BLOCKS:
                taps[i] = tokens
        layer_3 = self.act_postprocess3(taps[READOUT_BLOCKS[0]], grid)
        layer_4 = self.act_postprocess4(taps[READOUT_BLOCKS[1]], grid)
        return [layer_1, layer_2, layer_3, layer_4]


class ResidualConvUnit(nn.Module):
    """Pre-activation residual unit: x + conv(relu(conv(relu(x))))."""

    def __init__(self, features: int):
        super().__init__()
        self.conv1 = nn.Conv2d(features, features, 3, padding=1)
        self.conv2 = nn.Conv2d(features, features, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class FeatureFusionBlock(nn.Module):
    """One fusion level: add the skip feature (through ``resConfUnit1``), refine, upsample x2, project.

    The coarsest level has no skip input; its ``resConfUnit1`` is unused, but the checkpoint holds it.
    """

    def __init__(self, features: int):
        super().__init__()
        self.out_conv = nn.Conv2d(features, features, 1)
        self.resConfUnit1 = ResidualConvUnit(features)
        self.resConfUnit2 = ResidualConvUnit(features)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if skip is not None:
            x = x + self.resConfUnit1(skip)
        x = self.resConfUnit2(x)
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)
        return self.out_conv(x)


class DPTDepthModel(nn.Module):
    """DPT-Hybrid: ``pretrained`` (backbone and reassembly), ``scratch`` (fusion and head).

    ``features`` is the fusion width; ``backbone`` sizes go to :func:`hybrid_vit` (the defaults
    are MiDaS's dpt_hybrid). Returns relative inverse depth, shape (B, H, W), at the input resolution.
    """

    def __init__(self, features: int = 256, **backbone: Any):
        super().__init__()
        vit = hybrid_vit(**backbone)
        self.image_size = vit.patch_embed.img_size[0]
        stages = {info["module"]: info["num_chs"] for info in vit.patch_embed.backbone.feature_info}
        levels = [stages["stages.0"], stages["stages.1"], vit.embed_dim, vit.embed_dim]
        self.pretrained = HybridBackbone(vit, levels)
        scratch = nn.Module()
        for i, channels in enumerate(levels, start=1):
            scratch.add_module(f"layer{i}_rn", nn.Conv2d(channels, features, 3, padding=1, bias=False))
        for i in range(1, 5):
            scratch.add_module(f"refinenet{i}", FeatureFusionBlock(features))
        scratch.output_conv = nn.Sequential(
            nn.Conv2d(features, features // 2, 3, padding=1),
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True),
            nn.Conv2d(features // 2, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 1, 1),
            nn.ReLU(),
        )
        self.scratch = scratch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.scratch
        layer_1, layer_2, layer_3, layer_4 = self.pretrained(x)
        path = s.refinenet4(s.layer4_rn(layer_4))
        path = s.refinenet3(path, s.layer3_rn(layer_3))
        path = s.refinenet2(path, s.layer2_rn(layer_2))
        path = s.refinenet1(path, s.layer1_rn(layer_1))
        return s.output_conv(path).squeeze(1)
