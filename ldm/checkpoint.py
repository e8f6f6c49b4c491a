"""Reading, writing and strictly applying checkpoints.

One reader for ``.ckpt``/``.pt``/``.pth`` (pickles, loaded with ``weights_only=True``: a
pickle that tries to run code is refused), ``.safetensors`` and diffusers folders; atomic writers; and a
strict loader that explains what a mismatch most likely means.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Mapping

import torch
from torch import nn

from ldm.fileio import atomic_path

if TYPE_CHECKING:
    from omegaconf import DictConfig

logger = logging.getLogger(__name__)

NATIVE_MHA_CONVERTER = "python tools/convert_native_mha.py"


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be read, or whose tensors do not fit the model."""


def _is_safetensors(path: Path) -> bool:
    return path.suffix == ".safetensors"


_WEIGHTS_ONLY_REFUSAL = "Weights only load failed"
# What torch.save writes: a zip archive, or (before PyTorch 1.6, or with the legacy option) a
# pickle stream opening with the PROTO opcode of protocol 2 to 5.
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTO = 0x80


def _looks_like_torch_file(path: Path) -> bool:
    """Whether ``path`` starts the way a ``torch.save`` file does (a zip archive or a pickle)."""
    with open(path, "rb") as f:
        head = f.read(len(_ZIP_MAGIC))
    return head == _ZIP_MAGIC or (len(head) >= 2 and head[0] == _PICKLE_PROTO and 2 <= head[1] <= 5)


def _refers_to_code(detail: str) -> bool:
    """Whether a weights-only refusal is about the pickle naming a Python object (a global to
    import, a class to build), rather than about bytes that are no valid pickle at all."""
    return re.search(r"\bGLOBAL\b|allowlisted", detail) is not None


def _refusal_detail(error: pickle.UnpicklingError) -> str:
    """The part of torch's (wordy, version-dependent) weights-only refusal naming what was refused."""
    text = str(error)
    found = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*?)(?:\.\s|\n|$)", text)
    if found:
        return found.group(1)
    boilerplate = (_WEIGHTS_ONLY_REFUSAL, "Please file an issue", "Check the documentation", "(")
    lines = [line.strip() for line in text.splitlines()]
    detail = [line for line in lines if line and not line.startswith(boilerplate)]
    return detail[0] if detail else lines[0]


def load_state_dict(
    path: str | os.PathLike, device: str | torch.device = "cpu", config: DictConfig | None = None
) -> dict[str, torch.Tensor]:
    """Read a checkpoint's tensors: its ``state_dict`` entry, or the flat dict itself; a diffusers
    folder converted to the original layout of ``config``'s model (None: the folder's own config;
    see :mod:`ldm.diffusers_format`)."""
    path = Path(path)
    if path.is_dir():
        from ldm.diffusers_format import load_folder

        return load_folder(path, config, device)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if _is_safetensors(path):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path, device=str(device))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from None
    obj = read_torch_file(path, device)
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} holds no state dict (a mapping of names to tensors)")
    return dict(obj)


def read_torch_file(path: Path, device: str | torch.device = "cpu") -> object:
    """What a ``torch.save`` file holds, read with ``weights_only=True`` (tensors, containers and
    plain values only); a ``CheckpointError`` naming the file for anything else."""
    if not _looks_like_torch_file(path):
        raise CheckpointError(
            f"{path} is not a PyTorch checkpoint: it is neither a zip archive nor a pickle, the two formats of torch.save"
        )
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as e:
        if not (str(e).startswith(_WEIGHTS_ONLY_REFUSAL) and _refers_to_code(_refusal_detail(e))):
            raise CheckpointError(
                f"{path} is not a readable PyTorch checkpoint (truncated or corrupt?): {_refusal_detail(e)}"
            ) from None
        raise CheckpointError(
            f"{path} was refused: it is not a plain-tensor checkpoint (weights_only=True loading rejects "
            f"pickles that run code or hold arbitrary objects). Detail: {_refusal_detail(e)}"
        ) from None
    except Exception as e:
        # Arbitrary bytes make the zip reader or the unpickler fail in many ways (KeyError,
        # IndexError, EOFError, RuntimeError, ...): all mean the same thing to the user.
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint (truncated or corrupt?): {type(e).__name__}: {e}"
        ) from None


def save_state_dict(
    state: Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    overwrite: bool = False,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write tensors atomically (see :func:`ldm.fileio.atomic_path`); never over an existing
    file unless ``overwrite``. The format follows the extension: ``.safetensors``, anything
    else a ``torch.save`` pickle with a ``state_dict`` entry.
    """
    with atomic_path(path, overwrite) as tmp:
        if _is_safetensors(Path(path)):
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in state.items()}, tmp, metadata=dict(metadata or {}))
        else:
            torch.save({"state_dict": dict(state)}, tmp)


def _preview(keys: Iterable[str], limit: int = 8) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return f"{len(keys)}: {shown}" + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def _kind(dtype: torch.dtype) -> str:
    """The kind of values a dtype holds: tensors of one kind load into each other by a cast."""
    if dtype.is_floating_point:
        return "floating point"
    if dtype.is_complex:
        return "complex"
    return "bool" if dtype == torch.bool else "integer"


def diagnose_mismatch(
    missing: Iterable[str],
    unexpected: Iterable[str],
    shapes: Mapping[str, tuple[tuple, tuple]] | None = None,
    dtypes: Mapping[str, tuple[torch.dtype, torch.dtype]] | None = None,
) -> str:
    """A human explanation of a strict-loading mismatch, naming the likely cause and the fix.

    ``shapes`` and ``dtypes`` map a key to its (checkpoint, model) shape or dtype.
    """
    missing, unexpected = set(missing), set(unexpected)
    shapes, dtypes = dict(shapes or {}), dict(dtypes or {})
    lines = []
    if missing:
        lines.append(f"missing keys {_preview(missing)}")
    if unexpected:
        lines.append(f"unexpected keys {_preview(unexpected)}")
    if shapes:
        lines.append("shape mismatches " + _preview(f"{k} (checkpoint {c}, model {m})" for k, (c, m) in shapes.items()))
    if dtypes:
        lines.append(
            "dtype mismatches "
            + _preview(f"{k} (checkpoint {c}, model expects {_kind(m)})" for k, (c, m) in dtypes.items())
        )
        found = sorted({str(c) for c, m in dtypes.values() if m.is_floating_point})
        if found:
            lines.append(
                f"The model's weights are floating point (float32, float16 and bfloat16 files load); this checkpoint "
                f"holds {', '.join(found)} tensors in their place: a quantized or otherwise converted file, which this "
                "code does not load."
            )

    def any_has(keys: set[str], *parts: str) -> bool:
        return any(p in k for k in keys for p in parts)

    native_keys = ("in_proj_weight", "q_proj_weight", "out_proj.weight")
    unet = "model.diffusion_model."
    if any(unet in k and any(n in k for n in native_keys) for k in unexpected) and any_has(missing, ".to_q."):
        lines.append(
            "The checkpoint is in the native-MHA layout and the config in the original layout: use the "
            f"*_native_mha.yaml config, or convert it back with `{NATIVE_MHA_CONVERTER} --reverse IN OUT`."
        )
    elif any(unet in k and ".to_q." in k for k in unexpected) and any(
        unet in k and any(n in k for n in native_keys) for k in missing
    ):
        lines.append(
            "The checkpoint is in the original layout and the config in the native-MHA layout "
            f"(use_native_mha: true): convert it with `{NATIVE_MHA_CONVERTER} IN OUT`, or use the original config."
        )
    if any("cond_stage_model.transformer.text_model" in k for k in unexpected) or any(
        k.endswith("attn2.to_k.weight") and c[-1] == 768 for k, (c, _) in shapes.items()
    ):
        lines.append("This looks like a Stable Diffusion 1.x checkpoint (CLIP ViT-L text encoder, 768-dim context); SD2 configs need an SD2 checkpoint.")
    family = _family_hint(missing, unexpected)
    if family:
        lines.append(family)
    family_note = _unet_input_note(shapes)
    if family_note:
        lines.append(family_note)
    depth_note = _depth_model_note(missing, unexpected)
    if depth_note and not family_note:
        lines.append(depth_note)
    return "\n".join(lines)


# The SD2 families by the input channels of their UNet (``input_blocks.0.0.weight``, dim 1):
# name, what the channels hold, the config that builds it.
UNET_INPUT_FAMILIES = {
    4: ("text-to-image", "latent", "configs/stable-diffusion/v2-inference.yaml (512, eps) or v2-inference-v.yaml (768, v)"),
    5: ("depth-to-image", "latent, depth", "configs/stable-diffusion/v2-midas-inference.yaml"),
    9: ("inpainting", "latent, mask, masked-image latent", "configs/stable-diffusion/v2-inpainting-inference.yaml"),
}
MIDAS_FILE = "midas_models/dpt_hybrid-midas-501f0c75.pt"


def _unet_input_note(shapes: Mapping[str, tuple[tuple, tuple]]) -> str | None:
    """Name the checkpoint's and the config's families when their UNet input widths differ."""
    found = [(c[1], m[1]) for k, (c, m) in shapes.items() if k.endswith("diffusion_model.input_blocks.0.0.weight")]
    if not found or found[0][0] == found[0][1]:
        return None
    ckpt, model = found[0]

    def family(channels: int) -> str:
        if channels not in UNET_INPUT_FAMILIES:
            return f"an unknown model ({channels} channels)"
        name, holds, _ = UNET_INPUT_FAMILIES[channels]
        return f"the {name} model ({channels} channels: {holds})"

    note = f"The UNet's input channels differ: a checkpoint of {family(ckpt)} and a config of {family(model)}."
    if ckpt in UNET_INPUT_FAMILIES:
        note += f" Use {UNET_INPUT_FAMILIES[ckpt][2]}."
    return note


def _depth_model_note(missing: set[str], unexpected: set[str]) -> str | None:
    """Explain a mismatch of the depth model's tensors (``depth_model.*``), if any."""
    lacking = [k for k in missing if k.startswith("depth_model.")]
    extra = [k for k in unexpected if k.startswith("depth_model.")]
    if extra and not lacking:
        return f"This is a depth-to-image checkpoint (depth_model.*): use {UNET_INPUT_FAMILIES[5][2]}."
    if lacking and not extra:
        return (
            f"The checkpoint lacks the MiDaS depth model ({len(lacking)} depth_model.* tensors). The original code read "
            f"it from {MIDAS_FILE} when built; here it comes from the checkpoint only: add that file's tensors to the "
            "checkpoint with the prefix depth_model.model."
        )
    if lacking and extra:
        return (
            f"The depth model's tensors are named otherwise ({len(lacking)} depth_model.* missing, {len(extra)} unexpected): "
            "the MiDaS backbone follows timm 1.0's names (depth_model.model.pretrained.model.*)."
        )
    return None



# SD2 families whose checkpoints hold tensors of their own: (name, config). unCLIP-L stores the
# whole OpenAI CLIP under embedder.model (text transformer included), unCLIP-H OpenCLIP ViT-H
# without its text transformer.
_X4 = ("the SD2 x4 upscaler", "x4-upscaling.yaml")
_UNCLIP_L = ("Stable unCLIP-L", "v2-1-stable-unclip-l-inference.yaml")
_UNCLIP_H = ("Stable unCLIP-H", "v2-1-stable-unclip-h-inference.yaml")
# Stability's generative-models ("sgm") layout, SD-Turbo's single file: the text encoder under
# conditioner.embedders.0, the noise levels as denoiser.sigmas, no schedule buffers.
_SGM_KEYS = ("conditioner.embedders.", "denoiser.sigmas")
_SGM = ("SD-Turbo in the generative-models layout (conditioner.embedders.0.*, denoiser.sigmas)", "sd-turbo.yaml")
_TEXT_TO_IMAGE = UNET_INPUT_FAMILIES[4][2]


def _family_hint(missing: set[str], unexpected: set[str]) -> str | None:
    """The config that a checkpoint of the x4, unCLIP or SD-Turbo family needs, or, when the config is
    of such a family and the checkpoint lacks its tensors, what the checkpoint more likely is."""

    def has(keys: set[str], *prefixes: str) -> bool:
        return any(k.startswith(prefixes) for k in keys)

    if has(unexpected, "low_scale_model."):
        family = _X4
    elif has(unexpected, "embedder.model.transformer."):
        family = _UNCLIP_L
    elif has(unexpected, "embedder.", "noise_augmentor.") or (
        has(missing, "embedder.model.transformer.") and not has(missing, "embedder.model.visual.")
    ):
        family = _UNCLIP_H  # its own keys, or the -L config's text transformer alone missing
    elif has(unexpected, *_SGM_KEYS):
        family = _SGM
    elif has(missing, *_SGM_KEYS) and has(unexpected, "cond_stage_model."):
        return (
            f"The config is for {_SGM[0]}, and the checkpoint is in the original layout (cond_stage_model.*, "
            f"schedule buffers); an SD2 text-to-image checkpoint needs {_TEXT_TO_IMAGE}."
        )
    elif has(missing, "low_scale_model.", "embedder.", "noise_augmentor."):
        expected = _X4[0] if has(missing, "low_scale_model.") else "Stable unCLIP"
        return (
            f"The config is for {expected}, and the checkpoint lacks that family's tensors; a text-to-image "
            f"checkpoint needs {_TEXT_TO_IMAGE}."
        )
    else:
        return None
    return f"This is a checkpoint of {family[0]}: use configs/stable-diffusion/{family[1]} (or its _native_mha twin)."


def apply_state_dict(
    model: nn.Module, state: Mapping[str, torch.Tensor], strict: bool = True, assign: bool = False
) -> None:
    """Load ``state`` into ``model``; a mismatch (keys, shapes, or a dtype of another kind, such as
    integer tensors for floating-point weights) raises :class:`CheckpointError` explaining it.

    ``model_ema.*`` entries are ignored (with a log line) when the model keeps no EMA.
    With ``assign=True`` the tensors are used as they are (no copy): the way to fill a model
    built on the ``meta`` device.
    """
    own = model.state_dict()
    if not any(k.startswith("model_ema.") for k in own):
        ema = [k for k in state if k.startswith("model_ema.")]
        if ema:
            logger.info("ignoring %d model_ema.* tensors: the config keeps no EMA weights", len(ema))
            state = {k: v for k, v in state.items() if not k.startswith("model_ema.")}
    missing = own.keys() - state.keys()
    unexpected = state.keys() - own.keys()
    common = own.keys() & state.keys()
    shapes = {k: (tuple(state[k].shape), tuple(own[k].shape)) for k in common if state[k].shape != own[k].shape}
    # A cast between kinds is never meant: integer weights would make load_state_dict either
    # round silently (copy) or fail once per tensor (assign, on parameters).
    dtypes = {k: (state[k].dtype, own[k].dtype) for k in common if _kind(state[k].dtype) != _kind(own[k].dtype)}
    if shapes or dtypes or (strict and (missing or unexpected)):
        raise CheckpointError(
            "checkpoint does not match the model:\n" + diagnose_mismatch(missing, unexpected, shapes, dtypes)
        )
    model.load_state_dict(state, strict=strict, assign=assign)
