"""LoRA (Hu et al. 2021) files as the peers write them, merged into a Stable Diffusion 2 model's weights.

Formats: kohya-ss / A1111 (``lora_unet_*`` and ``lora_te_*`` modules, ``.lora_down.weight``,
``.lora_up.weight``, ``.alpha``; 3x3 convolutions, "LoCon", included), and diffusers / peft
(``unet.*`` and ``text_encoder.*`` modules, ``.lora_A.weight``/``.lora_B.weight`` or
``.lora.down.weight``/``.lora.up.weight``, optional ``.alpha``). Both name the UNet's modules as
diffusers does and the text encoder's as transformers' CLIP does; the names are mapped onto this
codebase's modules (:mod:`ldm.diffusers_format.names`), for the original and the native-MHA layout
(q, k and v deltas go to their rows of ``in_proj_weight``).

A LoRA is merged: ``W += weight * alpha / rank * up @ down`` (in float32, rounded once to the
weight's dtype) before sampling, so it costs nothing per step; :meth:`LoraMerge.restore` puts the base weights back bit for bit. Every file is read and
checked before any weight changes, so an error leaves the model as it was.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from ldm.checkpoint import CheckpointError, load_state_dict
from ldm.diffusers_format.names import Layout, unet_to_diffusers

logger = logging.getLogger(__name__)

UNSUPPORTED = {"hada_": "LoHa", "lokr_": "LoKr", "dora_scale": "DoRA", "lora_mid": "LoCon with a Tucker core (lora_mid)"}
SDXL_MARKERS = ("lora_te1_", "lora_te2_", "text_encoder_2.")
TEXT_WIDTHS = {768: "SD 1.x", 1280: "SDXL"}
# One module's tensors, by file format: (module name, part) from a key.
_KOHYA = re.compile(r"^(lora_(?:unet|te)_.+?)\.(lora_down\.weight|lora_up\.weight|alpha)$")
_PEFT = re.compile(r"^((?:unet|text_encoder)\..+?)\.(lora_A\.weight|lora_B\.weight|lora\.down\.weight|lora\.up\.weight|alpha)$")
_PROCESSOR = re.compile(r"\.processor\.(to_q|to_k|to_v|to_out)_lora$")  # diffusers' old attention-processor files
PARTS = {"lora_down.weight": "down", "lora_A.weight": "down", "lora.down.weight": "down",
         "lora_up.weight": "up", "lora_B.weight": "up", "lora.up.weight": "up", "alpha": "alpha"}


class LoraError(CheckpointError):
    """A LoRA file that does not fit the model: another base, unknown modules, shapes, formats."""


@dataclass(frozen=True)
class Target:
    """A weight a LoRA changes: ``module``'s parameter ``name``, or its ``rows`` (q, k or v in a
    packed ``in_proj_weight``)."""

    module: nn.Module
    name: str
    rows: slice | None = None
    label: str = ""  # the module's name, for messages

    @property
    def weight(self) -> torch.Tensor:
        w = getattr(self.module, self.name)
        return w if self.rows is None else w[self.rows]


def _layout(unet: nn.Module) -> Layout:
    per = unet.num_res_blocks[0]
    levels = len(unet.channel_mult)
    attention = tuple(len(unet.input_blocks[1 + i * (per + 1)]) > 1 for i in range(levels))
    return Layout(levels, per, attention)


def _attention_targets(prefix: str, module: nn.Module) -> dict[str, Target]:
    """The original layout's to_q/to_k/to_v/to_out.0 of an attention module, in either layout."""
    if isinstance(module, nn.MultiheadAttention):  # native-MHA layout
        c = module.embed_dim
        if module._qkv_same_embed_dim:
            qkv = {f"to_{x}": Target(module, "in_proj_weight", slice(i * c, (i + 1) * c), prefix) for i, x in enumerate("qkv")}
        else:
            qkv = {f"to_{x}": Target(module, f"{x}_proj_weight", None, prefix) for x in "qkv"}
        return {f"{prefix}.{k}": v for k, v in qkv.items()} | {f"{prefix}.to_out.0": Target(module.out_proj, "weight", None, prefix)}
    return {}


def unet_targets(unet: nn.Module) -> dict[str, Target]:
    """Every weight of the UNet a LoRA may change, by its module's diffusers name."""
    by_original: dict[str, Target] = {}
    for name, module in unet.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            by_original.update(_attention_targets(name, module))
        elif isinstance(module, (nn.Linear, nn.Conv2d)) and not name.endswith("out_proj") and not name.startswith("label_emb"):
            by_original[name] = Target(module, "weight", None, name)
    placeholders = {f"{name}.weight": torch.empty(0) for name in by_original}
    renamed = unet_to_diffusers(placeholders, _layout(unet))
    original_of = {id(t): name.removesuffix(".weight") for name, t in placeholders.items()}
    return {key.removesuffix(".weight"): by_original[original_of[id(t)]] for key, t in renamed.items()}


def text_targets(encoder: nn.Module) -> dict[str, Target]:
    """Every weight of the OpenCLIP text encoder a LoRA may change, by transformers' CLIP name."""
    targets = {}
    for i, block in enumerate(encoder.model.transformer.resblocks):
        hf = f"text_model.encoder.layers.{i}"
        c = block.attn.embed_dim
        for j, x in enumerate("qkv"):
            targets[f"{hf}.self_attn.{x}_proj"] = Target(block.attn, "in_proj_weight", slice(j * c, (j + 1) * c), hf)
        targets[f"{hf}.self_attn.out_proj"] = Target(block.attn.out_proj, "weight", None, f"{hf}.self_attn.out_proj")
        targets[f"{hf}.mlp.fc1"] = Target(block.mlp.c_fc, "weight", None, f"{hf}.mlp.fc1")
        targets[f"{hf}.mlp.fc2"] = Target(block.mlp.c_proj, "weight", None, f"{hf}.mlp.fc2")
    return targets


def model_targets(net: nn.Module) -> dict[str, Target]:
    """A model's LoRA targets under both formats' names: ``lora_unet_*``/``lora_te_*`` (kohya)
    and ``unet.*``/``text_encoder.*`` (diffusers)."""
    targets: dict[str, Target] = {}
    for prefix, kohya, found in (("unet.", "lora_unet_", unet_targets(net.model.diffusion_model)),
                                 ("text_encoder.", "lora_te_", text_targets(net.cond_stage_model))):
        for name, target in found.items():
            targets[prefix + name] = target
            targets[kohya + name.replace(".", "_")] = target
    return targets


@dataclass
class Delta:
    """One module's low-rank update, ``scale * up @ down``, for ``target``."""

    target: Target
    down: torch.Tensor
    up: torch.Tensor
    scale: float

    def tensor(self) -> torch.Tensor:
        """The update, in float32, in the target weight's shape (3x3 convolutions: LoCon)."""
        down, up = self.down.float(), self.up.float()
        product = up.flatten(1) @ down.flatten(1)
        return (self.scale * product).reshape(self.target.weight.shape)


def _modules(state: dict[str, torch.Tensor], path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """A file's tensors grouped by module: {module name: {"down", "up", "alpha"}}."""
    for marker, kind in UNSUPPORTED.items():
        if any(marker in k for k in state):
            raise LoraError(f"{path} is a {kind} file: only LoRA (down/up pairs, LoCon included) is supported")
    if any(k.startswith(SDXL_MARKERS) for k in state):
        raise LoraError(f"{path} is a LoRA for SDXL (two text encoders); this is an SD 2.x model")
    modules: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, value in state.items():
        match = _KOHYA.match(key) or _PEFT.match(key)
        if match is None:
            unknown.append(key)
            continue
        name = _PROCESSOR.sub(lambda m: "." + m.group(1).replace("to_out", "to_out.0"), match.group(1))
        modules.setdefault(name, {})[PARTS[match.group(2)]] = value
    if unknown:
        raise LoraError(f"{path}: {len(unknown)} tensors are not LoRA tensors of a known format, e.g. {sorted(unknown)[:4]}")
    if not modules:
        raise LoraError(f"{path} holds no LoRA tensors")
    return modules


def read_lora(path: str | os.PathLike, targets: dict[str, Target], weight: float = 1.0) -> list[Delta]:
    """The updates of the LoRA in ``path`` for a model's ``targets`` (:func:`model_targets`), times
    ``weight``; every mismatch is a :class:`LoraError` (nothing is applied here)."""
    path = Path(path)
    modules = _modules(load_state_dict(path), path)
    unmatched = sorted(name for name in modules if name not in targets)
    if unmatched:
        raise LoraError(f"{path}: {len(unmatched)} of its {len(modules)} modules match none of this model's, e.g. {unmatched[:4]}"
                        + _base_hint(modules))
    deltas = []
    for name, parts in modules.items():
        if "down" not in parts or "up" not in parts:
            raise LoraError(f"{path}: module {name} lacks its {'down' if 'down' not in parts else 'up'} weight")
        down, up, target = parts["down"], parts["up"], targets[name]
        rank = down.shape[0]
        shape = tuple(target.weight.shape)
        if up.shape[0] != shape[0] or down.flatten(1).shape[1] != int(torch.tensor(shape[1:]).prod()) or up.flatten(1).shape[1] != rank:
            raise LoraError(f"{path}: module {name} ({target.label}) is {tuple(up.shape[:1])}x{tuple(down.shape[1:])} "
                            f"at rank {rank}; the model's weight is {shape}" + _base_hint(modules))
        alpha = float(parts["alpha"]) if "alpha" in parts else float(rank)
        deltas.append(Delta(target, down, up, weight * alpha / rank))
    return deltas


def _base_hint(modules: dict[str, dict[str, torch.Tensor]]) -> str:
    """Which base the file's text-encoder or cross-attention input width says it was trained on."""
    for name, parts in modules.items():
        down = parts.get("down")
        if down is not None and down.ndim == 2 and (("te_" in name or "text_encoder" in name) or "attn2" in name and name.endswith(("to_k", "to_v"))):
            base = TEXT_WIDTHS.get(down.shape[1])
            if base:
                return f" (its text is {down.shape[1]} wide: a LoRA for {base}; SD 2.x's is 1024)"
    return ""


@dataclass
class LoraMerge:
    """The LoRAs merged into a model, and the base weights they replaced (kept to restore them)."""

    loras: tuple[tuple[str, float], ...] = ()
    _saved: dict[tuple[int, str], tuple[nn.Module, str, torch.Tensor]] = field(default_factory=dict)

    def restore(self) -> None:
        """Put the base weights back, bit for bit."""
        with torch.no_grad():
            for module, name, original in self._saved.values():
                getattr(module, name).copy_(original)
        self._saved.clear()
        self.loras = ()


def merge_loras(net: nn.Module, loras: Sequence[tuple[str | os.PathLike, float]], merge: LoraMerge | None = None) -> LoraMerge:
    """Merge ``loras`` ((file, weight) pairs) into ``net``'s weights, after restoring what ``merge``
    merged before; all files are read and checked first, so an error changes nothing."""
    targets = model_targets(net)
    deltas = [d for path, weight in loras for d in read_lora(path, targets, weight)]
    merge = merge or LoraMerge()
    merge.restore()
    with torch.no_grad():
        for delta in deltas:
            t = delta.target
            key = (id(t.module), t.name)
            if key not in merge._saved:
                merge._saved[key] = (t.module, t.name, getattr(t.module, t.name).detach().clone())
            weight = getattr(t.module, t.name)
            rows = weight if t.rows is None else weight[t.rows]
            rows.copy_(rows.float() + delta.tensor())  # one rounding, for weights held in half precision
    merge.loras = tuple((str(p), float(w)) for p, w in loras)
    if loras:
        logger.info("merged %d LoRA file(s): %d weights changed", len(loras), len(merge._saved))
    return merge


def lora_names(folder: str | os.PathLike) -> dict[str, Path]:
    """The LoRA files of ``folder`` by stem (what ``<lora:NAME:WEIGHT>`` in a prompt names)."""
    return {p.stem: p for p in sorted(Path(folder).iterdir()) if p.suffix in (".safetensors", ".pt", ".ckpt", ".bin") and p.is_file()}


LORA_TAG = re.compile(r"<lora:([^:>]+)(?::([^>]*))?>")


def prompt_loras(prompt: str) -> tuple[str, list[tuple[str, float]]]:
    """A1111's ``<lora:NAME:WEIGHT>`` tags (weight 1 when left out) taken out of ``prompt``."""
    tags = []
    for match in LORA_TAG.finditer(prompt):
        try:
            weight = float(match.group(2)) if match.group(2) else 1.0
        except ValueError:
            raise LoraError(f"<lora:{match.group(1)}:{match.group(2)}>: the weight must be a number") from None
        tags.append((match.group(1).strip(), weight))
    return LORA_TAG.sub("", prompt), tags
