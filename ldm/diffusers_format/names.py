"""Tensor names of the original layout against diffusers' and transformers', both ways.

Each network's names come from one table of (original prefix, diffusers prefix, renames inside
it) pairs, built from the network's structure; reading the table one way or the other gives the
two directions, so they invert each other by construction. Tensors are passed as they are
(no copy) but for the few whose layout differs:

* the VAE's attention: 1x1 convolutions here ``[C, C, 1, 1]``, linear layers in diffusers ``[C, C]``;
* the text encoder's attention: one ``in_proj_weight``/``in_proj_bias`` here (OpenCLIP's
  ``nn.MultiheadAttention``), separate ``q_proj``/``k_proj``/``v_proj`` in transformers' CLIP.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from ldm.checkpoint import CheckpointError

UNET = "model.diffusion_model."
VAE = "first_stage_model."
TEXT = "cond_stage_model.model."

_UNET_RESNET = (
    ("in_layers.0.", "norm1."), ("in_layers.2.", "conv1."), ("emb_layers.1.", "time_emb_proj."),
    ("out_layers.0.", "norm2."), ("out_layers.3.", "conv2."), ("skip_connection.", "conv_shortcut."),
)
_VAE_RESNET = (("nin_shortcut.", "conv_shortcut."),)
_VAE_ATTENTION = (("norm.", "group_norm."), ("q.", "to_q."), ("k.", "to_k."), ("v.", "to_v."), ("proj_out.", "to_out.0."))
_TEXT_BLOCK = (
    ("ln_1.", "layer_norm1."), ("ln_2.", "layer_norm2."), ("mlp.c_fc.", "mlp.fc1."), ("mlp.c_proj.", "mlp.fc2."),
    ("attn.out_proj.", "self_attn.out_proj."),
)


class DiffusersFormatError(CheckpointError):
    """A diffusers folder that cannot be read or converted, or a model that cannot be written as one."""


# diffusers before 0.14 named the VAE attention's layers otherwise; SD2 folders of that time still do.
LEGACY_VAE_ATTENTION = {"query.": "to_q.", "key.": "to_k.", "value.": "to_v.", "proj_attn.": "to_out.0."}


@dataclass(frozen=True)
class Layout:
    """What fixes a UNet's or a VAE's names: its resolution levels, the residual blocks per level
    (the encoder's count; decoders have one more), and (UNet) which levels attend, finest first."""

    levels: int
    blocks: int
    attention: tuple[bool, ...] = ()


@dataclass(frozen=True)
class _Pair:
    original: str
    diffusers: str
    renames: tuple[tuple[str, str], ...] = ()
    conv1x1: bool = False  # linear weights in diffusers, 1x1 convolutions here


def _unet_pairs(layout: Layout) -> list[_Pair]:
    n, per = layout.levels, layout.blocks
    pairs = [
        _Pair("time_embed.0.", "time_embedding.linear_1."), _Pair("time_embed.2.", "time_embedding.linear_2."),
        _Pair("input_blocks.0.0.", "conv_in."), _Pair("out.0.", "conv_norm_out."), _Pair("out.2.", "conv_out."),
        _Pair("middle_block.0.", "mid_block.resnets.0.", _UNET_RESNET), _Pair("middle_block.1.", "mid_block.attentions.0."),
        _Pair("middle_block.2.", "mid_block.resnets.1.", _UNET_RESNET),
    ]
    for i in range(n):
        for j in range(per):  # input block 0 is conv_in; each level adds its blocks and a downsampler
            k = 1 + i * (per + 1) + j
            pairs.append(_Pair(f"input_blocks.{k}.0.", f"down_blocks.{i}.resnets.{j}.", _UNET_RESNET))
            if layout.attention[i]:
                pairs.append(_Pair(f"input_blocks.{k}.1.", f"down_blocks.{i}.attentions.{j}."))
        if i < n - 1:
            pairs.append(_Pair(f"input_blocks.{(i + 1) * (per + 1)}.0.op.", f"down_blocks.{i}.downsamplers.0.conv."))
        up_attention = layout.attention[n - 1 - i]  # up block i works at level n - 1 - i
        for j in range(per + 1):
            k = i * (per + 1) + j
            pairs.append(_Pair(f"output_blocks.{k}.0.", f"up_blocks.{i}.resnets.{j}.", _UNET_RESNET))
            if up_attention:
                pairs.append(_Pair(f"output_blocks.{k}.1.", f"up_blocks.{i}.attentions.{j}."))
        if i < n - 1:  # the upsampler follows the level's last block, after its attention if any
            k = i * (per + 1) + per
            pairs.append(_Pair(f"output_blocks.{k}.{2 if up_attention else 1}.conv.", f"up_blocks.{i}.upsamplers.0.conv."))
    return pairs


def _vae_pairs(layout: Layout) -> list[_Pair]:
    n, per = layout.levels, layout.blocks
    pairs = [_Pair("quant_conv.", "quant_conv."), _Pair("post_quant_conv.", "post_quant_conv.")]
    for side in ("encoder", "decoder"):
        pairs += [
            _Pair(f"{side}.conv_in.", f"{side}.conv_in."), _Pair(f"{side}.conv_out.", f"{side}.conv_out."),
            _Pair(f"{side}.norm_out.", f"{side}.conv_norm_out."),
            _Pair(f"{side}.mid.block_1.", f"{side}.mid_block.resnets.0.", _VAE_RESNET),
            _Pair(f"{side}.mid.block_2.", f"{side}.mid_block.resnets.1.", _VAE_RESNET),
            _Pair(f"{side}.mid.attn_1.", f"{side}.mid_block.attentions.0.", _VAE_ATTENTION, conv1x1=True),
        ]
    for i in range(n):
        pairs += [_Pair(f"encoder.down.{i}.block.{j}.", f"encoder.down_blocks.{i}.resnets.{j}.", _VAE_RESNET) for j in range(per)]
        if i < n - 1:
            pairs.append(_Pair(f"encoder.down.{i}.downsample.conv.", f"encoder.down_blocks.{i}.downsamplers.0.conv."))
        level = n - 1 - i  # the decoder's up blocks count from the coarsest level, the original's from the finest
        pairs += [_Pair(f"decoder.up.{level}.block.{j}.", f"decoder.up_blocks.{i}.resnets.{j}.", _VAE_RESNET) for j in range(per + 1)]
        if i < n - 1:
            pairs.append(_Pair(f"decoder.up.{level}.upsample.conv.", f"decoder.up_blocks.{i}.upsamplers.0.conv."))
    return pairs


def _text_pairs(layers: int) -> list[_Pair]:
    """transformers' names without the ``text_model.`` level (see :func:`text_to_original`)."""
    pairs = [
        _Pair("token_embedding.", "embeddings.token_embedding."),
        _Pair("positional_embedding", "embeddings.position_embedding.weight"),
        _Pair("ln_final.", "final_layer_norm."),
    ]
    pairs += [_Pair(f"transformer.resblocks.{i}.", f"encoder.layers.{i}.", _TEXT_BLOCK) for i in range(layers)]
    return pairs


def _matches(key: str, prefix: str) -> bool:
    return key == prefix if not prefix.endswith(".") else key.startswith(prefix)


def _rename(rest: str, renames: Sequence[tuple[str, str]], to_diffusers: bool) -> str:
    for original, diffusers in renames:
        old, new = (original, diffusers) if to_diffusers else (diffusers, original)
        if rest.startswith(old):
            return new + rest[len(old):]
    return rest


def _convert(state: Mapping[str, torch.Tensor], pairs: list[_Pair], to_diffusers: bool, what: str) -> dict[str, torch.Tensor]:
    # No prefix lies inside another (they end with "."; "middle_block.1." is none of "middle_block.10."):
    # a key matches one pair at most.
    out, unmatched = {}, []
    for key, value in state.items():
        for pair in pairs:
            source, target = (pair.original, pair.diffusers) if to_diffusers else (pair.diffusers, pair.original)
            if _matches(key, source):
                name = target + _rename(key[len(source):], pair.renames, to_diffusers)
                if pair.conv1x1 and key.endswith(".weight") and value.ndim in (2, 4):
                    value = value.reshape(*value.shape[:2]) if to_diffusers else value.reshape(*value.shape[:2], 1, 1)
                out[name] = value
                break
        else:
            unmatched.append(key)
    if unmatched:
        shown = ", ".join(sorted(unmatched)[:8]) + (f", ... ({len(unmatched) - 8} more)" if len(unmatched) > 8 else "")
        raise DiffusersFormatError(f"{len(unmatched)} {what} tensors have no counterpart in the other layout: {shown}")
    return out


def unet_to_original(state: Mapping[str, torch.Tensor], layout: Layout) -> dict[str, torch.Tensor]:
    """diffusers' UNet2DConditionModel tensors as ``model.diffusion_model.*``."""
    return {UNET + k: v for k, v in _convert(state, _unet_pairs(layout), False, "UNet").items()}


def unet_to_diffusers(state: Mapping[str, torch.Tensor], layout: Layout) -> dict[str, torch.Tensor]:
    """``model.diffusion_model.*`` tensors (prefix removed) in UNet2DConditionModel's names."""
    return _convert(state, _unet_pairs(layout), True, "UNet")


def vae_to_original(state: Mapping[str, torch.Tensor], layout: Layout) -> dict[str, torch.Tensor]:
    """diffusers' AutoencoderKL tensors as ``first_stage_model.*`` (legacy attention names too)."""
    modern = {}
    for key, value in state.items():
        for old, new in LEGACY_VAE_ATTENTION.items():
            key = key.replace(f"attentions.0.{old}", f"attentions.0.{new}")
        modern[key] = value
    return {VAE + k: v for k, v in _convert(modern, _vae_pairs(layout), False, "VAE").items()}


def vae_to_diffusers(state: Mapping[str, torch.Tensor], layout: Layout) -> dict[str, torch.Tensor]:
    """``first_stage_model.*`` tensors (prefix removed) in AutoencoderKL's names."""
    return _convert(state, _vae_pairs(layout), True, "VAE")


def text_to_original(state: Mapping[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    """transformers' CLIPTextModel tensors (with or without the ``text_model.`` level, which
    transformers 5 dropped) as ``cond_stage_model.model.*``, q/k/v joined into ``in_proj_*``.
    Its ``position_ids`` (a constant some files hold) is dropped; ``text_projection.weight``
    (CLIPTextModelWithProjection only) becomes OpenCLIP's ``text_projection``, transposed."""
    plain = {k.removeprefix("text_model."): v for k, v in state.items() if not k.endswith("embeddings.position_ids")}
    out = {}
    if "text_projection.weight" in plain:
        out[TEXT + "text_projection"] = plain.pop("text_projection.weight").T
    for i in range(layers):
        for kind in ("weight", "bias"):
            parts = [plain.pop(f"encoder.layers.{i}.self_attn.{x}_proj.{kind}", None) for x in "qkv"]
            if any(p is None for p in parts):
                raise DiffusersFormatError(f"text encoder layer {i}: its q_proj, k_proj and v_proj {kind}s are not all there")
            out[f"{TEXT}transformer.resblocks.{i}.attn.in_proj_{kind}"] = torch.cat(parts)
    out.update({TEXT + k: v for k, v in _convert(plain, _text_pairs(layers), False, "text encoder").items()})
    return out


def text_to_diffusers(state: Mapping[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    """``cond_stage_model.model.*`` tensors (prefix removed) of the first ``layers`` blocks in
    CLIPTextModel's names (``text_model.*``, as every SD2 folder holds them); q/k/v are copies,
    so that no two saved tensors share memory. Other entries are the caller's to drop first."""
    plain = dict(state)
    out = {}
    for i in range(layers):
        for kind in ("weight", "bias"):
            parts = plain.pop(f"transformer.resblocks.{i}.attn.in_proj_{kind}").chunk(3)
            out.update({f"encoder.layers.{i}.self_attn.{x}_proj.{kind}": p.clone() for x, p in zip("qkv", parts)})
    out.update(_convert(plain, _text_pairs(layers), True, "text encoder"))
    return {"text_model." + k: v for k, v in out.items()}
