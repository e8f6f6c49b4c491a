"""A YAML config's model as diffusers' JSON configs.

The structure that fixes the tensor names (:class:`~ldm.diffusers_format.names.Layout`), the
JSON configs a model of the config is written with (UNet2DConditionModel, AutoencoderKL,
CLIPTextModel, DDIMScheduler, the pipeline's ``model_index.json``), and which of the converted
SD2 families the config's model class is.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from ldm.diffusers_format.names import DiffusersFormatError, Layout

CONFIG_DIR = "configs/stable-diffusion"
# (family, parameterization) -> the original config of that model.
CONFIGS = {
    ("text-to-image", "eps"): "v2-inference.yaml",
    ("text-to-image", "v"): "v2-inference-v.yaml",
    ("inpainting", "eps"): "v2-inpainting-inference.yaml",
}
MODEL_CLASSES = {"text-to-image": "LatentDiffusion", "inpainting": "LatentInpaintDiffusion"}
PIPELINES = {"text-to-image": "StableDiffusionPipeline", "inpainting": "StableDiffusionInpaintPipeline"}
PREDICTION_TYPES = {"epsilon": "eps", "v_prediction": "v"}
# The version of the format written: the oldest diffusers the test extra takes.
DIFFUSERS_VERSION = "0.30.0"
# The OpenCLIP text-tower options CLIPTextModel can express (the others keep their defaults).
_TEXT_TOWER_OPTIONS = {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio"}


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
