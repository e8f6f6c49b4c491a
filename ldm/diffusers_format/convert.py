"""An SD2 model between a diffusers folder and the original layout's state dict, both ways.

Every tensor the model computes with maps one to one (:mod:`ldm.diffusers_format.names`); what
the two formats do not share:

* **The text tower's last layer.** SD2 conditions on the penultimate layer of OpenCLIP
  ViT-H/14 (24 layers; ``layer: penultimate``, then the final layer norm). The original
  checkpoint holds all 24 layers, the text projection and ``logit_scale``; diffusers' folder
  holds 23 layers and no projection, since its pipeline takes the last hidden state, through the
  final layer norm: the same conditioning. The 24th layer, the projection and ``logit_scale`` are
  never used by SD2 (the embedder stops before the last block and projects nothing), so reading
  a folder fills them: the layer with zeros, which makes it the identity (its attention and MLP
  add zero to their input, so ``layer: last`` conditions exactly as ``penultimate`` then), the
  projection with zeros, ``logit_scale`` with CLIP's initial value (the embedder's own default).
  Writing a folder drops them (logged). So folder -> original -> folder is bit-exact, and
  original -> folder -> original is bit-exact but for those 14 unused tensors, which come back
  as the fillers.
* **The noise schedule.** Original files hold it as buffers (``betas``, ``alphas_cumprod``, ...),
  diffusers as the scheduler's ``beta_start``/``beta_end``; the buffers are computed from these as
  the model computes them from its config, so they equal a freshly built model's bit for bit.
* **EMA weights** (``model_ema.*``) have no place in a diffusers folder and are not written (logged).
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any, Mapping

import torch
from omegaconf import DictConfig

from ldm import native_mha
from ldm.diffusers_format import names
from ldm.diffusers_format.configs import (
    model_family, model_index_json, scheduler_json, text_encoder_json, text_tower, unet_json, unet_layout, vae_json,
    vae_layout,
)
from ldm.diffusers_format.files import read_weights, tokenizer_files, write_folder
from ldm.diffusers_format.identify import Folder, check_config, inspect_folder
from ldm.diffusers_format.names import TEXT, UNET, VAE, DiffusersFormatError
from ldm.modules.diffusionmodules.util import ddpm_schedule, make_beta_schedule

logger = logging.getLogger(__name__)

SCHEDULE_KEYS = tuple(ddpm_schedule(make_beta_schedule("linear", 2)))
# The text tower's tensors that SD2 never uses, beside its last block (see the module docstring).
UNUSED_TEXT = (TEXT + "text_projection", TEXT + "logit_scale")
CLIP_LOGIT_SCALE = math.log(1 / 0.07)


def schedule_state(scheduler: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The original's schedule buffers for a scheduler config (SD's scaled-linear betas), as
    :meth:`~ldm.models.diffusion.ddpm.LatentDiffusion.register_schedule` computes them."""
    betas = make_beta_schedule("linear", int(scheduler["num_train_timesteps"]), scheduler["beta_start"], scheduler["beta_end"])
    return {name: torch.tensor(value, dtype=torch.float32) for name, value in ddpm_schedule(betas).items()}


def _uses_native_mha(config: DictConfig) -> bool:
    return bool(config.model.params.unet_config.params.get("use_native_mha", False))


def _text_to_original(folder: Folder, weights: dict[str, torch.Tensor], config: DictConfig) -> dict[str, torch.Tensor]:
    tower, layer = text_tower(config)
    total, held = tower["text_cfg"]["layers"], int(folder.text_encoder["num_hidden_layers"])
    if held == total and layer == "penultimate":
        raise DiffusersFormatError(
            f"{folder.path}: the text encoder has all {total} layers and diffusers conditions on the last, but the config "
            f"on the penultimate (layer: penultimate); SD2's diffusers folders hold {total - 1}")
    if held not in (total, total - 1):
        raise DiffusersFormatError(f"{folder.path}: the text encoder has {held} layers, the config's text tower {total}")
    state = names.text_to_original(weights, held)
    if held == total - 1:
        block = f"{TEXT}transformer.resblocks."
        state.update({k.replace(f"{block}0.", f"{block}{held}."): torch.zeros_like(v)
                      for k, v in state.items() if k.startswith(f"{block}0.")})
        logger.info("text encoder: %d of the tower's %d layers; the last, unused by SD2, filled with zeros (the identity)", held, total)
    like = state[TEXT + "ln_final.weight"]
    state.setdefault(TEXT + "text_projection", like.new_zeros(tower["text_cfg"]["width"], tower["embed_dim"]))
    state[TEXT + "logit_scale"] = like.new_tensor(CLIP_LOGIT_SCALE)
    return state


def to_original(
    folder: Folder, config: DictConfig, device: str | torch.device = "cpu", config_path: str | os.PathLike = "the config"
) -> dict[str, torch.Tensor]:
    """The model of a diffusers folder as the original layout's state dict for ``config``
    (checked to describe it; the native-MHA layout when the config's UNet is); ``config_path``
    names the config in errors."""
    check_config(folder, config, config_path)
    state = names.unet_to_original(read_weights(folder.path, "unet", device), folder.unet_layout)
    state.update(names.vae_to_original(read_weights(folder.path, "vae", device), folder.vae_layout))
    state.update(_text_to_original(folder, read_weights(folder.path, "text_encoder", device), config))
    state.update(schedule_state(folder.scheduler))
    return native_mha.to_native(state) if _uses_native_mha(config) else state


def load_folder(path: str | os.PathLike, config: DictConfig | None = None, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """:func:`to_original` of the folder at ``path``; ``config`` None: the folder's own
    original config (:attr:`Folder.config_name`)."""
    from ldm.loading import load_config

    folder = inspect_folder(path)
    if config is None:
        return to_original(folder, load_config(folder.config_path), device, folder.config_name)
    return to_original(folder, config, device)


def check_complete(state: Mapping[str, torch.Tensor], config: DictConfig) -> None:
    """Raise :class:`~ldm.checkpoint.CheckpointError` unless ``state`` is exactly the model of
    ``config`` (the strict load's check, on the model built on the meta device: nothing allocated),
    so that no incomplete file or folder is written."""
    from ldm.checkpoint import apply_state_dict
    from ldm.loading import build_model

    apply_state_dict(build_model(config, "meta"), state, assign=True)


def _check_schedule(state: Mapping[str, torch.Tensor], config: DictConfig) -> None:
    """The checkpoint's schedule buffers are the config's (a diffusers scheduler holds nothing else):
    to float16's precision, the coarsest a released file stores them in."""
    expected = schedule_state(scheduler_json(config))
    for name in ("betas", "alphas_cumprod"):
        if name in state and not torch.allclose(state[name].double(), expected[name].double(), rtol=1e-3, atol=0):
            raise DiffusersFormatError(f"the checkpoint's noise schedule ({name}) is not the config's "
                                       "scaled-linear one, which is all a diffusers scheduler config holds")


def to_diffusers(state: Mapping[str, torch.Tensor], config: DictConfig) -> tuple[dict, dict, dict]:
    """The original-layout (or native-MHA) ``state`` of ``config``'s model as a diffusers folder's
    contents: JSON configs and tokenizer files by path, and each component's tensors."""
    family = model_family(config)
    tower, layer = text_tower(config)
    check_complete(state, config)
    if native_mha.detect_layout(state) == native_mha.NATIVE:
        state = native_mha.to_original(state)
    _check_schedule(state, config)
    keep = tower["text_cfg"]["layers"] - (layer == "penultimate")
    unused = {f"{TEXT}transformer.resblocks.{keep}.", *UNUSED_TEXT}
    parts: dict[str, dict[str, torch.Tensor]] = {"unet": {}, "vae": {}, "text_encoder": {}}
    dropped, unknown = [], []
    for key, value in state.items():
        if key in SCHEDULE_KEYS:
            continue
        if key.startswith(tuple(unused)) or key.startswith("model_ema."):
            dropped.append(key)
            continue
        for component, prefix in (("unet", UNET), ("vae", VAE), ("text_encoder", TEXT)):
            if key.startswith(prefix):
                parts[component][key[len(prefix):]] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise DiffusersFormatError(f"{len(unknown)} tensors have no place in a diffusers folder: {', '.join(sorted(unknown)[:8])}")
    if dropped:
        logger.info("not written to the diffusers folder (unused by SD2 or EMA copies): %d tensors, e.g. %s", len(dropped), dropped[0])
    weights = {
        "unet": names.unet_to_diffusers(parts["unet"], unet_layout(config)),
        "vae": names.vae_to_diffusers(parts["vae"], vae_layout(config)),
        "text_encoder": names.text_to_diffusers(parts["text_encoder"], keep),
    }
    configs = {
        "model_index.json": model_index_json(family), "unet/config.json": unet_json(config),
        "vae/config.json": vae_json(config), "text_encoder/config.json": text_encoder_json(config, keep),
        "scheduler/scheduler_config.json": scheduler_json(config),
    }
    arch = config.model.params.cond_stage_config.get("params", {}).get("arch", "ViT-H-14")
    text_files = {f"tokenizer/{k}": v for k, v in tokenizer_files(arch, tower["text_cfg"].get("context_length", 77)).items()}
    return configs, weights, text_files


def save_folder(state: Mapping[str, torch.Tensor], config: DictConfig, path: str | os.PathLike, overwrite: bool = False) -> None:
    """Write ``state`` (``config``'s model) as a diffusers folder at ``path``, atomically."""
    configs, weights, text_files = to_diffusers(state, config)
    write_folder(path, configs, weights, text_files, overwrite)
