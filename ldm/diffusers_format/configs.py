"""A diffusers folder's JSON configs against this codebase's YAML configs.

What the folder is (SD2 text-to-image or inpainting, eps or v: the scheduler's
``prediction_type`` decides, and names the config), or a clear error saying what it is instead;
the structure that fixes its tensor names; the JSON configs a YAML config's model is written
with; and the check that a folder and a config describe the same computation, which compares
the folder's JSON with what that config would write, on every entry that matters, since some
(attention heads, prediction type, noise schedule, latent scale) change no tensor's shape and
would pass the strict load unnoticed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ldm.diffusers_format.names import DiffusersFormatError, Layout

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = "configs/stable-diffusion"
# (family, parameterization) -> the original config of that model.
CONFIGS = {
    ("text-to-image", "eps"): "v2-inference.yaml",
    ("text-to-image", "v"): "v2-inference-v.yaml",
    ("inpainting", "eps"): "v2-inpainting-inference.yaml",
}
FAMILIES = {4: "text-to-image", 9: "inpainting"}  # by the UNet's input channels
MODEL_CLASSES = {"text-to-image": "LatentDiffusion", "inpainting": "LatentInpaintDiffusion"}
PIPELINES = {"text-to-image": "StableDiffusionPipeline", "inpainting": "StableDiffusionInpaintPipeline"}
PREDICTION_TYPES = {"epsilon": "eps", "v_prediction": "v"}
# The version of the format written: the oldest diffusers the test extra takes.
DIFFUSERS_VERSION = "0.30.0"

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
# The OpenCLIP text-tower options CLIPTextModel can express (the others keep their defaults).
_TEXT_TOWER_OPTIONS = {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio"}
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


# -- a YAML config's model as diffusers' JSON configs -----------------------------------------
def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def unet_layout(config: DictConfig) -> Layout:
    p = config.model.params.unet_config.params
    if not isinstance(p.num_res_blocks, int):
        raise DiffusersFormatError(f"num_res_blocks {_plain(p.num_res_blocks)}: diffusers' UNet has one count for every level")
    return Layout(len(p.channel_mult), p.num_res_blocks, tuple(2**i in p.attention_resolutions for i in range(len(p.channel_mult))))


def vae_layout(config: DictConfig) -> Layout:
    dd = config.model.params.first_stage_config.params.ddconfig
    if list(dd.get("attn_resolutions", [])):
        raise DiffusersFormatError(f"the autoencoder has attention at resolutions {list(dd.attn_resolutions)}, which "
                                   "diffusers' AutoencoderKL cannot hold")
    return Layout(len(dd.ch_mult), dd.num_res_blocks)


def _heads(p: DictConfig) -> list[int]:
    channels = [p.model_channels * m for m in p.channel_mult]
    if p.get("num_head_channels", -1) != -1:
        return [c // p.num_head_channels for c in channels]
    return [int(p.num_heads)] * len(channels)


def unet_json(config: DictConfig) -> dict[str, Any]:
    """UNet2DConditionModel's config for the model of ``config``; attention heads are
    ``attention_head_dim``, as diffusers names them in every SD2 folder."""
    p, layout = config.model.params.unet_config.params, unet_layout(config)
    depth = _plain(p.get("transformer_depth", 1))
    return {
        "_class_name": "UNet2DConditionModel", "_diffusers_version": DIFFUSERS_VERSION,
        "sample_size": int(config.model.params.get("image_size", 64)),
        "in_channels": p.in_channels, "out_channels": p.out_channels,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in layout.attention],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(layout.attention)],
        "block_out_channels": [p.model_channels * m for m in p.channel_mult],
        "layers_per_block": p.num_res_blocks, "cross_attention_dim": p.context_dim,
        "attention_head_dim": _heads(p), "use_linear_projection": bool(p.get("use_linear_in_transformer", False)),
        "transformer_layers_per_block": depth,
        "upcast_attention": True,  # the original computes attention scores in float32 (ATTN_PRECISION)
    }


def vae_json(config: DictConfig) -> dict[str, Any]:
    params = config.model.params
    dd = params.first_stage_config.params.ddconfig
    return {
        "_class_name": "AutoencoderKL", "_diffusers_version": DIFFUSERS_VERSION,
        "sample_size": int(params.get("image_size", 64)) * 2 ** (len(dd.ch_mult) - 1),
        "in_channels": dd.in_channels, "out_channels": dd.out_ch, "latent_channels": dd.z_channels,
        "down_block_types": ["DownEncoderBlock2D"] * len(dd.ch_mult), "up_block_types": ["UpDecoderBlock2D"] * len(dd.ch_mult),
        "block_out_channels": [dd.ch * m for m in dd.ch_mult], "layers_per_block": dd.num_res_blocks,
        "scaling_factor": float(params.get("scale_factor", 1.0)),
    }


def text_tower(config: DictConfig) -> tuple[dict[str, Any], str]:
    """The OpenCLIP model config of the text encoder (``arch``) and its ``layer``."""
    from ldm.modules.encoders.modules import open_clip_model_config

    params = config.model.params.cond_stage_config.get("params", {})
    tower = open_clip_model_config(params.get("arch", "ViT-H-14"))
    extra = set(tower["text_cfg"]) - _TEXT_TOWER_OPTIONS
    if extra:
        raise DiffusersFormatError(f"the text tower's options {sorted(extra)} have no CLIPTextModel equivalent")
    return tower, params.get("layer", "last")


def text_encoder_json(config: DictConfig, layers: int) -> dict[str, Any]:
    """CLIPTextModel's config for the text tower of ``config``, with ``layers`` layers."""
    tower, _ = text_tower(config)
    text = tower["text_cfg"]
    return {
        "architectures": ["CLIPTextModel"], "model_type": "clip_text_model",
        "hidden_size": text["width"], "intermediate_size": int(text["width"] * text.get("mlp_ratio", 4.0)),
        "num_hidden_layers": layers, "num_attention_heads": text["heads"],
        "max_position_embeddings": text.get("context_length", 77), "vocab_size": text.get("vocab_size", 49408),
        "hidden_act": "quick_gelu" if tower.get("quick_gelu", False) else "gelu", "layer_norm_eps": 1e-5,
        "projection_dim": tower["embed_dim"], "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 0,
        "attention_dropout": 0.0, "dropout": 0.0, "initializer_factor": 1.0, "initializer_range": 0.02,
    }


def scheduler_json(config: DictConfig) -> dict[str, Any]:
    """DDIMScheduler's config (the original's sampler) with the model's noise schedule."""
    params = config.model.params
    if params.get("beta_schedule", "linear") != "linear" or params.get("given_betas") is not None:
        raise DiffusersFormatError("only SD's noise schedule (beta_schedule linear, diffusers' scaled_linear) is written")
    return {
        "_class_name": "DDIMScheduler", "_diffusers_version": DIFFUSERS_VERSION,
        "num_train_timesteps": int(params.get("timesteps", 1000)), "beta_start": float(params.get("linear_start", 1e-4)),
        "beta_end": float(params.get("linear_end", 2e-2)), "beta_schedule": "scaled_linear", "trained_betas": None,
        "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1, "timestep_spacing": "leading",
        "prediction_type": next(k for k, v in PREDICTION_TYPES.items() if v == params.get("parameterization", "eps")),
    }


def model_family(config: DictConfig) -> str:
    """The family of the config's model, of those converted."""
    name = str(config.model.target).rsplit(".", 1)[-1]
    for family, model_class in MODEL_CLASSES.items():
        if name == model_class:
            return family
    raise DiffusersFormatError(f"a {name} model: the SD2 models converted are {' and '.join(MODEL_CLASSES.values())}")


def model_index_json(family: str) -> dict[str, Any]:
    return {
        "_class_name": PIPELINES[family], "_diffusers_version": DIFFUSERS_VERSION,
        "scheduler": ["diffusers", "DDIMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"], "safety_checker": [None, None], "feature_extractor": [None, None],
        "requires_safety_checker": False,
    }


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
        unet[key] = _per_level(unet.get(key, 1), len(unet["block_out_channels"]))
        ours[key] = _per_level(ours[key], levels)
    # The scheduler's defaults are diffusers' (epsilon prediction), the text encoder's the folder's.
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
