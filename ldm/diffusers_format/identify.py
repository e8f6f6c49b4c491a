"""What a diffusers folder holds, and whether a config describes it.

The folder is recognised from its JSON configs alone (no weights read): SD2 text-to-image or
inpainting, eps or v (the scheduler's ``prediction_type`` decides), which names its original
config; anything else is a clear error saying what it is instead. A folder and a config describe
the same computation when the folder's JSON equals what that config would write on every entry
that matters: some (attention heads, prediction type, noise schedule, latent scale) change no
tensor's shape and would pass the strict load unnoticed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from ldm.diffusers_format.configs import (
    CONFIG_DIR, CONFIGS, PREDICTION_TYPES, model_family, scheduler_json, text_encoder_json, unet_json, vae_json,
)
from ldm.diffusers_format.names import DiffusersFormatError, Layout

REPO_ROOT = Path(__file__).resolve().parents[2]
FAMILIES = {4: "text-to-image", 9: "inpainting"}  # by the UNet's input channels

# Components only other families' pipelines have: what the folder is, and what to do instead.
OTHER_FAMILIES = {
    "text_encoder_2": "an SDXL model (two text encoders); this code runs Stable Diffusion 2",
    "transformer": "a transformer-based model (SD3, Flux, PixArt, ...), not a UNet; this code runs Stable Diffusion 2",
    "depth_estimator": "SD2 depth-to-image, whose MiDaS model diffusers holds in transformers' DPT layout: not "
    "converted; use the original 512-depth-ema checkpoint with configs/stable-diffusion/v2-midas-inference.yaml",
    "low_res_scheduler": "the SD2 x4 upscaler: not converted; use the original x4-upscaler-ema checkpoint with "
    "configs/stable-diffusion/x4-upscaling.yaml",
    "image_noising_scheduler": "Stable unCLIP: not converted; use the original sd21-unclip checkpoint with "
    "configs/stable-diffusion/v2-1-stable-unclip-h-inference.yaml (or -l)",
}
# Settings of diffusers' models that SD2's networks have one value of (diffusers' defaults): a
# folder with another value is some other network, even where its tensors would load.
UNET_FIXED = {
    "act_fn": "silu", "norm_num_groups": 32, "norm_eps": 1e-5, "flip_sin_to_cos": True, "freq_shift": 0,
    "center_input_sample": False, "downsample_padding": 1, "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn", "only_cross_attention": False, "dual_cross_attention": False,
    "resnet_time_scale_shift": "default", "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional", "time_embedding_dim": None, "time_embedding_act_fn": None,
    "timestep_post_act": None, "time_cond_proj_dim": None, "conv_in_kernel": 3, "conv_out_kernel": 3,
    "class_embed_type": None, "num_class_embeds": None, "addition_embed_type": None, "encoder_hid_dim": None,
    "attention_type": "default", "cross_attention_norm": None, "class_embeddings_concat": False,
}
VAE_FIXED = {
    "act_fn": "silu", "norm_num_groups": 32, "use_quant_conv": True, "use_post_quant_conv": True,
    "mid_block_add_attention": True, "shift_factor": None, "latents_mean": None, "latents_std": None,
}
TEXT_FIXED = {"model_type": "clip_text_model", "layer_norm_eps": 1e-5}
SCHEDULER_FIXED = {"beta_schedule": "scaled_linear", "trained_betas": None, "rescale_betas_zero_snr": False}
_COMPONENTS = ("unet", "vae", "text_encoder", "scheduler")
_CONFIG_FILES = {"unet": "config.json", "vae": "config.json", "text_encoder": "config.json", "scheduler": "scheduler_config.json"}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DiffusersFormatError(f"{path}: not a readable JSON config: {e}") from None
    if not isinstance(data, dict):
        raise DiffusersFormatError(f"{path}: not a JSON object")
    return data


def _differences(where: str, config: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    return [f"{where} {key} is {config[key]!r}, not {value!r}" for key, value in expected.items() if key in config and config[key] != value]


@dataclass(frozen=True)
class Folder:
    """A diffusers SD2 pipeline folder, read and recognised: its JSON configs by component."""

    path: Path
    family: str
    parameterization: str
    model_index: dict[str, Any]
    unet: dict[str, Any]
    vae: dict[str, Any]
    text_encoder: dict[str, Any]
    scheduler: dict[str, Any]

    @property
    def config_name(self) -> str:
        """The original config of this model, relative to the repository."""
        return f"{CONFIG_DIR}/{CONFIGS[self.family, self.parameterization]}"

    @property
    def config_path(self) -> Path:
        """:attr:`config_name` in this checkout."""
        return REPO_ROOT / self.config_name

    @property
    def unet_layout(self) -> Layout:
        down, up = self.unet["down_block_types"], self.unet["up_block_types"]
        attention = tuple(t == "CrossAttnDownBlock2D" for t in down)
        if any(t not in ("CrossAttnDownBlock2D", "DownBlock2D") for t in down) or list(up) != [
            "CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)
        ]:
            raise DiffusersFormatError(f"{self.path}/unet/config.json: blocks {down} / {up} are not SD2's UNet "
                                       "(CrossAttn or plain down blocks, mirrored by the up blocks)")
        return Layout(len(self.unet["block_out_channels"]), int(self.unet["layers_per_block"]), attention)

    @property
    def vae_layout(self) -> Layout:
        return Layout(len(self.vae["block_out_channels"]), int(self.vae["layers_per_block"]))


def is_diffusers_folder(path: str | Path) -> bool:
    """Whether ``path`` is a folder holding a diffusers ``model_index.json``."""
    return (Path(path) / "model_index.json").is_file()


def inspect_folder(path: str | Path) -> Folder:
    """Read a diffusers folder's configs (cheap: no weights) and recognise an SD2 model in it;
    anything else raises :class:`DiffusersFormatError` saying what it is."""
    path = Path(path)
    if not path.is_dir():
        raise DiffusersFormatError(f"{path}: no such folder")
    if not is_diffusers_folder(path):
        if (path / "config.json").is_file() and (path.parent / "model_index.json").is_file():
            raise DiffusersFormatError(f"{path} is one component of a diffusers pipeline: pass its folder, {path.parent}")
        raise DiffusersFormatError(f"{path} is a folder but no diffusers pipeline (it has no model_index.json)")
    model_index = _read_json(path / "model_index.json")
    for component, what in OTHER_FAMILIES.items():
        if model_index.get(component, [None])[0] is not None:
            raise DiffusersFormatError(f"{path} holds {what} ({model_index.get('_class_name', 'no pipeline class')})")
    missing = [c for c in _COMPONENTS if not (path / c / _CONFIG_FILES[c]).is_file()]
    if missing:
        raise DiffusersFormatError(f"{path} lacks the {', '.join(f'{c}/{_CONFIG_FILES[c]}' for c in missing)} of an SD2 pipeline")
    configs = {c: _read_json(path / c / _CONFIG_FILES[c]) for c in _COMPONENTS}
    unet, text = configs["unet"], configs["text_encoder"]
    if text.get("hidden_size") == 768 or unet.get("cross_attention_dim") == 768:
        raise DiffusersFormatError(f"{path} holds a Stable Diffusion 1.x model (CLIP ViT-L text encoder, 768-wide "
                                   "context); this code runs Stable Diffusion 2 (OpenCLIP ViT-H, 1024)")
    channels = unet.get("in_channels")
    if channels not in FAMILIES:
        known = {5: "SD2 depth-to-image", 7: "the SD2 x4 upscaler"}
        raise DiffusersFormatError(f"{path}: a UNet of {channels} input channels ({known.get(channels, 'an unknown model')}); "
                                   "the SD2 models converted have 4 (text-to-image) or 9 (inpainting)")
    problems = (_differences("unet/config.json", unet, UNET_FIXED) + _differences("vae/config.json", configs["vae"], VAE_FIXED)
                + _differences("text_encoder/config.json", text, TEXT_FIXED)
                + _differences("scheduler/scheduler_config.json", configs["scheduler"], SCHEDULER_FIXED))
    if problems:
        raise DiffusersFormatError(f"{path} is not an SD2 model this code can run: " + "; ".join(problems))
    prediction = configs["scheduler"].get("prediction_type", "epsilon")
    if prediction not in PREDICTION_TYPES:
        raise DiffusersFormatError(f"{path}/scheduler/scheduler_config.json: prediction_type {prediction!r}; "
                                   f"SD2 models predict {' or '.join(PREDICTION_TYPES)}")
    family, parameterization = FAMILIES[channels], PREDICTION_TYPES[prediction]
    if (family, parameterization) not in CONFIGS:
        raise DiffusersFormatError(f"{path}: an {family} model with {prediction} prediction, which SD2 has no config for")
    return Folder(path, family, parameterization, model_index, **configs)


# -- a folder against a config -----------------------------------------------------------------
def _per_level(value: Any, levels: int) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value] * levels


_UNET_KEYS = ("in_channels", "out_channels", "down_block_types", "up_block_types", "block_out_channels",
              "layers_per_block", "cross_attention_dim", "use_linear_projection")
_VAE_KEYS = ("in_channels", "out_channels", "latent_channels", "block_out_channels", "layers_per_block", "scaling_factor")
_TEXT_KEYS = ("hidden_size", "intermediate_size", "num_attention_heads", "max_position_embeddings", "vocab_size", "hidden_act")
_SCHEDULER_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "prediction_type")


def check_config(folder: Folder, config: DictConfig, config_path: str | Path = "the config") -> None:
    """Raise :class:`DiffusersFormatError` unless ``config`` describes the folder's model: its
    family, and every entry of the folder's JSON configs that the config fixes."""
    family = model_family(config)
    own = f" (the folder's config is {folder.config_name})" if Path(str(config_path)).name != Path(folder.config_name).name else ""
    if family != folder.family:
        raise DiffusersFormatError(f"{folder.path} holds an SD2 {folder.family} model, {config_path} describes {family}{own}")
    unet = {**folder.unet, "attention_head_dim": folder.unet.get("num_attention_heads") or folder.unet.get("attention_head_dim")}
    ours = unet_json(config)
    levels = len(ours["block_out_channels"])
    for key in ("attention_head_dim", "transformer_layers_per_block"):
        unet[key] = _per_level(unet.get(key, 1), len(unet.get("block_out_channels", ())))
        ours[key] = _per_level(ours[key], levels)
    # diffusers' default prediction type, where the scheduler config names none.
    scheduler = {"prediction_type": "epsilon", **folder.scheduler}
    pairs = [
        ("unet/config.json", unet, ours, (*_UNET_KEYS, "attention_head_dim", "transformer_layers_per_block")),
        ("vae/config.json", folder.vae, vae_json(config), _VAE_KEYS),
        ("text_encoder/config.json", folder.text_encoder, text_encoder_json(config, 0), _TEXT_KEYS),
        ("scheduler/scheduler_config.json", scheduler, scheduler_json(config), _SCHEDULER_KEYS),
    ]
    problems = []
    for where, theirs, expected, keys in pairs:
        wrong = [(f"{key} is {theirs[key]!r}" if key in theirs else f"no {key}") + f", the config's {expected[key]!r}"
                 for key in keys if theirs.get(key) != expected[key]]
        if wrong:
            problems.append(f"{where}: {', '.join(wrong)}")
    if problems:
        raise DiffusersFormatError(f"{folder.path} is not the model of {config_path}{own}: " + "; ".join(problems))
