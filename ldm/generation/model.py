"""The model's files, sizes and loading: config and checkpoint paths, geometry, sampler, compile probe."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from ldm.checkpoint import CheckpointError
from ldm.generation.errors import GenerationError
from ldm.loading import build_model, load_model_from_config
from ldm.util import instantiate_from_config

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
SD2_CONFIG = Path("configs/stable-diffusion/v2-inference.yaml")
DEMO_CONFIG = REPO_ROOT / "configs" / "demo" / "shapes-demo.yaml"
DEMO_CKPT = Path(__file__).resolve().parents[1] / "demo" / "shapes-demo.safetensors"


@dataclass
class ModelFiles:
    config: Path
    ckpt: Path | None  # None: random weights
    demo: bool = False


def resolve_model_files(args: argparse.Namespace) -> ModelFiles:
    """The config and checkpoint to use; the demo model when neither was named and it is installed."""
    if args.config is None and args.ckpt is None and not args.random_weights and DEMO_CONFIG.is_file() and DEMO_CKPT.is_file():
        return ModelFiles(DEMO_CONFIG, DEMO_CKPT, demo=True)
    config = Path(args.config) if args.config else SD2_CONFIG
    if args.config is None and not config.exists():
        config = REPO_ROOT / SD2_CONFIG  # the original's default path, wherever the script is run from
    _check_readable(config, "--config")
    if args.random_weights:
        return ModelFiles(config, None)
    if args.ckpt is None:
        raise GenerationError(
            f"--ckpt is required with {config}: pass an SD2 checkpoint (e.g. --ckpt v2-1_512-ema-pruned.ckpt), "
            "or --random_weights for timing runs"
        )
    ckpt = Path(args.ckpt)
    _check_readable(ckpt, "--ckpt")
    return ModelFiles(config, ckpt)


def _check_readable(path: Path, flag: str) -> None:
    if not path.exists():
        raise GenerationError(f"{flag} {path}: no such file")
    if not path.is_file():
        raise GenerationError(f"{flag} {path}: not a file")
    if not os.access(path, os.R_OK):
        raise GenerationError(f"{flag} {path}: not readable (permission denied)")


def read_config(path: Path) -> DictConfig:
    """The YAML config, checked to describe a latent-diffusion model."""
    try:
        config = OmegaConf.load(path)
    except Exception as e:  # YAML syntax, encoding and OS errors alike
        raise GenerationError(f"--config {path}: cannot be read as YAML: {e}") from None
    params = OmegaConf.select(config, "model.params") if isinstance(config, DictConfig) else None
    if not params or "unet_config" not in params or "first_stage_config" not in params:
        raise GenerationError(f"--config {path}: not a latent-diffusion config (needs model.params.unet_config and first_stage_config)")
    return config


@dataclass
class Geometry:
    """Sizes the model fixes: latent channels, the autoencoder's and UNet's downsampling, native size."""

    channels: int
    vae_factor: int
    unet_factor: int
    latent_size: int

    @property
    def multiple(self) -> int:
        """Image sides must be multiples of this."""
        return self.vae_factor * self.unet_factor


def model_geometry(config: DictConfig, path: Path) -> Geometry:
    """Read the sizes off the UNet and autoencoder built on the meta device (costs nothing)."""
    params = config.model.params
    try:
        with torch.device("meta"):
            unet = instantiate_from_config(params.unet_config)
            vae = instantiate_from_config(params.first_stage_config)
    except Exception as e:
        raise GenerationError(f"--config {path}: cannot build its UNet and autoencoder: {type(e).__name__}: {e}") from None
    return Geometry(int(params.get("channels", 4)), vae.downsampling_factor, unet.downsampling_factor, int(params.get("image_size", 64)))


def check_compile(device: torch.device) -> None:
    """Compile a trivial function first: a missing compiler toolchain fails here, clearly, before the
    model is loaded. --compile never falls back to eager, so timings are never silently mislabelled."""
    import torch._dynamo

    if not torch._dynamo.is_dynamo_supported():
        raise GenerationError(f"--compile: torch.compile does not support this Python ({sys.version.split()[0]}) with torch {torch.__version__}")
    try:
        torch.compile(lambda x: torch.sin(x) + 1.0)(torch.ones(8, device=device))
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise GenerationError(f"--compile: torch.compile cannot compile for {device.type} here ({reason}); run without --compile") from None


def load_model(files: ModelFiles, config: DictConfig, device: torch.device) -> torch.nn.Module:
    """The model with the checkpoint's weights, or random ones for --random_weights."""
    if files.ckpt is None:
        logger.warning("--random_weights: the model of %s gets random weights; the images are noise (use this for timing only)", files.config)
        try:
            model = build_model(config, device)
        except Exception as e:
            raise GenerationError(f"--config {files.config}: cannot build its model: {type(e).__name__}: {e}") from None
        return model.to(device).eval()
    logger.info("loading %s with %s", files.ckpt, files.config)
    try:
        return load_model_from_config(config, files.ckpt, device)
    except CheckpointError as e:
        raise GenerationError(f"cannot load --ckpt into the model of --config {files.config}: {e}") from None
    except Exception as e:
        raise GenerationError(f"cannot load the model of {files.config} from {files.ckpt}: {type(e).__name__}: {e}") from None


def make_sampler(model: torch.nn.Module, args: argparse.Namespace, device: torch.device) -> tuple[Any, str]:
    """The sampler the flags choose and its name for metadata: DDIM unless --plms or --dpm."""
    from ldm.models.diffusion.ddim import DDIMSampler
    from ldm.models.diffusion.dpm_solver import DPMSolverSampler
    from ldm.models.diffusion.plms import PLMSSampler

    if getattr(args, "plms", False):
        return PLMSSampler(model, device=device), "plms"
    if getattr(args, "dpm", False):
        return DPMSolverSampler(model, device=device), "dpm"
    return DDIMSampler(model, device=device), "ddim"
