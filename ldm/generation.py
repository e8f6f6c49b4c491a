"""What scripts/txt2img.py and scripts/img2img.py share: their flags, input checks, model and
sampler setup, seeding, the timed generation loop and the image files it writes.

The interface is the original SD2 scripts' (same flags and defaults), plus flags that make
the scripts a benchmark: ``--compile``, SDPA backend switches, ``--skip_first``,
``--time_file``/``--stats_file`` and ``--random_weights``. Bad input ends the run before
anything is written, with one ``error:`` line and exit status 2 (a flag's value) or 1 (a
file, the model, the platform). See docs/txt2img.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import random
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image, PngImagePlugin
from tqdm.auto import tqdm, trange
from tqdm.contrib.logging import logging_redirect_tqdm

from ldm.checkpoint import CheckpointError
from ldm.fileio import atomic_path, write_text
from ldm.loading import build_model, load_model_from_config
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.modules.attention import IMPLEMENTATIONS, check_implementation, sdpa_backends, set_attention_implementation
from ldm.util import instantiate_from_config

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
SD2_CONFIG = Path("configs/stable-diffusion/v2-inference.yaml")
DEMO_CONFIG = REPO_ROOT / "configs" / "demo" / "shapes-demo.yaml"
DEMO_CKPT = Path(__file__).resolve().parent / "demo" / "shapes-demo.safetensors"
DEMO_PROMPT = "a red circle"
DEFAULT_PROMPTS = {
    "txt2img": "a professional photograph of an astronaut riding a triceratops",
    "img2img": "a painting of a virus monster playing guitar",
}
WATERMARK = "SDV2"
WATERMARK_MIN_PIXELS = 256 * 256  # imwatermark refuses smaller images
VAE_SLICE_PIXELS = 4 * 512 * 512  # automatic --vae_slice_size: about 1 Mpixel per decoder call
SAMPLE_NAME = re.compile(r"^(\d{5,})\.png$")
GRID_NAME = re.compile(r"^grid-(\d{4,})\.png$")


class UsageError(Exception):
    """A flag's value that cannot work: exit status 2, like argparse's own errors."""


class GenerationError(Exception):
    """A file, model or platform problem: exit status 1."""


# -- flags ---------------------------------------------------------------------------------
def _int_at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    return parse


def _float_in(low: float, high: float = math.inf) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be in [{low}, {high}], got {value}")
        return value

    return parse


def _seed(text: str) -> int:
    value = _int_at_least(0)(text)
    if value >= 2**32:
        raise argparse.ArgumentTypeError(f"must be below 2**32 (numpy's limit), got {value}")
    return value


def build_parser(kind: str) -> argparse.ArgumentParser:
    """The flags of ``kind`` ("txt2img" or "img2img"): the original script's, then the shared new ones."""
    img2img = kind == "img2img"
    p = argparse.ArgumentParser(
        prog=f"{kind}.py",
        description=("Image to image" if img2img else "Text to image") + " with Stable Diffusion 2 (see docs/txt2img.md).",
    )
    pos1, pos0 = _int_at_least(1), _int_at_least(0)
    p.add_argument("--prompt", type=str, nargs="?", default=None,
                   help=f"the prompt to render (default: {DEFAULT_PROMPTS[kind]!r}; {DEMO_PROMPT!r} for the demo model)")
    if img2img:
        p.add_argument("--init-img", type=str, required=True, help="path to the input image")
    p.add_argument("--outdir", type=str, nargs="?", default=f"outputs/{kind}-samples", help="folder to write results to (default: %(default)s)")
    names = ["--steps", "--ddim_steps"] if img2img else ["--steps"]  # the original img2img's name kept as an alias
    p.add_argument(*names, dest="steps", type=pos1, default=50, help="number of sampling steps (default: %(default)s)")
    if not img2img:
        samplers = p.add_mutually_exclusive_group()
        samplers.add_argument("--plms", action="store_true", help="use PLMS sampling")
        samplers.add_argument("--dpm", action="store_true", help="use DPM-Solver++ (2M) sampling")
    p.add_argument("--fixed_code", action="store_true",
                   help="use the same starting noise for every batch" + (" (the noise of the encoding)" if img2img else ""))
    p.add_argument("--ddim_eta", type=_float_in(0.0), default=0.0, help="DDIM eta, 0.0 for deterministic sampling (default: %(default)s)")
    p.add_argument("--n_iter", type=pos1, default=1 if img2img else 3, help="sample this often (default: %(default)s)")
    if img2img:
        p.add_argument("--strength", type=_float_in(0.0, 1.0), default=0.8,
                       help="how much the init image is noised, 1.0 destroys it entirely (default: %(default)s)")
    else:
        p.add_argument("--H", type=pos1, default=None, help="image height in pixels (default: the model's, 512 for SD2 base)")
        p.add_argument("--W", type=pos1, default=None, help="image width in pixels (default: the model's, 512 for SD2 base)")
    p.add_argument("--C", type=pos1, default=None, help="latent channels (default: the model's, 4 for SD2)")
    p.add_argument("--f", type=pos1, default=None, help="autoencoder downsampling factor (default: the model's, 8 for SD2)")
    p.add_argument("--n_samples", type=pos1, default=2 if img2img else 3, help="images per prompt batch, the batch size (default: %(default)s)")
    p.add_argument("--n_rows", type=pos0, default=0, help="images per row of the grid (default: 0, n_samples)")
    p.add_argument("--scale", type=float, default=9.0,
                   help="classifier-free guidance scale: eps = eps(x, empty) + scale * (eps(x, cond) - eps(x, empty) (default: %(default)s)")
    p.add_argument("--from-file", type=str, default=None, help="read prompts from this file, one per line")
    p.add_argument("--repeat", type=pos1, default=1, help="with --from-file: repeat each prompt this often (default: %(default)s)")
    p.add_argument("--config", type=str, default=None,
                   help=f"model config (default: {SD2_CONFIG}, or the demo model when neither --config nor --ckpt is given)")
    p.add_argument("--ckpt", type=str, default=None, help="model checkpoint (.ckpt or .safetensors)")
    p.add_argument("--seed", type=_seed, default=42, help="the seed for reproducible sampling (default: %(default)s)")
    p.add_argument("--precision", choices=["full", "autocast"], default="autocast", help="evaluate at this precision (default: %(default)s)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu",
                   help="device to run on (default: %(default)s)")
    p.add_argument("--bf16", action="store_true", help="autocast to bfloat16 (implies --precision autocast)")

    bench = p.add_argument_group("speed and benchmarking")
    bench.add_argument("--attention", choices=IMPLEMENTATIONS, default="sdpa",
                       help="attention kernel of original-layout checkpoints (native-MHA checkpoints always use nn.MultiheadAttention) (default: %(default)s)")
    bench.add_argument("--disable_flash", action="store_true", help="disable SDPA's flash-attention backend")
    bench.add_argument("--disable_mem_efficient", action="store_true", help="disable SDPA's memory-efficient backend")
    bench.add_argument("--disable_math", action="store_true", help="disable SDPA's math backend")
    bench.add_argument("--compile", action="store_true", help="compile the UNet with torch.compile")
    bench.add_argument("--compile_mode", type=str, default=None,
                       help="torch.compile mode: default, reduce-overhead, max-autotune, ... (default: default)")
    bench.add_argument("--skip_first", action="store_true",
                       help="run one warm-up batch of each batch size first, neither timed nor saved")
    bench.add_argument("--time_file", type=str, default=None,
                       help="write the seconds of the timed iterations (sampling + decoding) to this file")
    bench.add_argument("--stats_file", type=str, default=None, help="write timing, memory and settings as JSON to this file")
    bench.add_argument("--random_weights", action="store_true",
                       help="random weights instead of --ckpt (timing only: the images are noise)")
    bench.add_argument("--no_watermark", action="store_true", help="do not add the invisible watermark")
    bench.add_argument("--vae_slice_size", type=pos1, default=None,
                       help=f"decode at most this many latents at a time (default: as many as make {VAE_SLICE_PIXELS // 2**20} Mpixel, at least 1)")
    return p


def check_flags(args: argparse.Namespace) -> None:
    """Combinations of flags that cannot work, found before anything is loaded."""
    if getattr(args, "plms", False) and args.ddim_eta != 0:
        raise UsageError(f"--plms needs --ddim_eta 0 (got {args.ddim_eta})")
    if getattr(args, "dpm", False) and args.steps < 2:
        raise UsageError(f"--dpm needs at least 2 --steps (got {args.steps})")
    if args.disable_flash and args.disable_mem_efficient and args.disable_math:
        raise UsageError("--disable_flash, --disable_mem_efficient and --disable_math together leave SDPA no backend: keep one")
    if args.device == "cpu" and args.disable_flash and args.disable_math:
        raise UsageError("on the CPU, SDPA has only the flash and math backends: --disable_flash and --disable_math leave it none")
    try:
        check_implementation(args.attention)
    except (RuntimeError, ValueError) as e:
        raise UsageError(f"--attention: {e}") from None
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available to this PyTorch; use --device cpu")
    if args.compile_mode is not None and not args.compile:
        logger.warning("--compile_mode has no effect without --compile")
    if args.compile:
        from torch._inductor import list_mode_options

        modes = ["default", *list_mode_options()]
        if (args.compile_mode or "default") not in modes:
            raise UsageError(f"--compile_mode {args.compile_mode!r}: choose one of {', '.join(dict.fromkeys(modes))}")
    if args.random_weights and args.ckpt:
        raise UsageError("--random_weights and --ckpt exclude each other")
    if args.repeat != 1 and not args.from_file:
        logger.warning("--repeat only applies to --from-file prompts")


# -- inputs --------------------------------------------------------------------------------
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


def _shown(path: Path) -> str:
    """``path`` relative to the repository when inside it."""
    return str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else str(path)


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


def check_latent_flags(args: argparse.Namespace, geometry: Geometry) -> None:
    """--f and --C, when given, must be the model's."""
    if args.f is not None and args.f != geometry.vae_factor:
        raise UsageError(f"--f {args.f}: this model's autoencoder downsamples by {geometry.vae_factor}")
    if args.C is not None and args.C != geometry.channels:
        raise UsageError(f"--C {args.C}: this model's latents have {geometry.channels} channels")


def image_size(args: argparse.Namespace, geometry: Geometry) -> tuple[int, int]:
    """--H and --W (default: the model's native size), checked against the model's sizes."""
    native = geometry.latent_size * geometry.vae_factor
    height, width = args.H or native, args.W or native
    m = geometry.multiple
    for flag, side in (("--H", height), ("--W", width)):
        if side % m:
            lower, upper = side // m * m, side // m * m + m
            nearest = f"{lower} or {upper}" if lower else str(upper)
            raise UsageError(
                f"{flag} {side}: image sides must be multiples of {m} for this model (autoencoder factor "
                f"{geometry.vae_factor} x UNet downsampling {geometry.unet_factor}): {m}, {2 * m}, {3 * m}, ...; nearest: {nearest}"
            )
    return height, width


def read_prompts(args: argparse.Namespace, default: str) -> list[list[str]]:
    """Prompt batches: n_samples copies of --prompt, or the lines of --from-file in chunks of n_samples."""
    if not args.from_file:
        return [args.n_samples * [args.prompt if args.prompt is not None else default]]
    path = Path(args.from_file)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise GenerationError(f"--from-file {path}: no such file") from None
    except UnicodeDecodeError as e:
        raise GenerationError(f"--from-file {path}: not UTF-8 text ({e})") from None
    except OSError as e:
        raise GenerationError(f"--from-file {path}: cannot be read: {e.strerror or e}") from None
    prompts = [line for line in lines if line.strip() for _ in range(args.repeat)]
    if not prompts:
        raise GenerationError(f"--from-file {path}: holds no prompts (one per line; blank lines are skipped)")
    logger.info("read %d prompts from %s", len(prompts) // args.repeat, path)
    return [prompts[i : i + args.n_samples] for i in range(0, len(prompts), args.n_samples)]


def load_init_image(path: str, multiple: int) -> torch.Tensor:
    """The image as a (1, 3, h, w) tensor in [-1, 1], sides cut down to multiples of ``multiple``
    and resized with Lanczos, as the original img2img does (with 64 for SD2)."""
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
    except FileNotFoundError:
        raise GenerationError(f"--init-img {path}: no such file") from None
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise GenerationError(f"--init-img {path}: cannot be read as an image: {e}") from None
    w, h = image.size
    new_w, new_h = w - w % multiple, h - h % multiple
    if not new_w or not new_h:
        raise GenerationError(f"--init-img {path}: {w}x{h} is too small, sides must be at least {multiple} pixels")
    if (new_w, new_h) != (w, h):
        logger.info("init image %dx%d resized to %dx%d (sides must be multiples of %d)", w, h, new_w, new_h, multiple)
    image = image.resize((new_w, new_h), resample=Image.LANCZOS)
    array = np.asarray(image).astype(np.float32) / 255.0
    return 2.0 * torch.from_numpy(array[None].transpose(0, 3, 1, 2).copy()) - 1.0


def _check_writable_folder(path: Path, flag: str) -> None:
    """``path`` is, or can be created as, a writable folder."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise GenerationError(f"{flag} {path}: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise GenerationError(f"{flag} {path}: {existing} is not writable")


def check_output_paths(args: argparse.Namespace) -> None:
    """Fail now, not after a long run, when an output cannot be written."""
    _check_writable_folder(Path(args.outdir), "--outdir")
    for flag, name in (("--time_file", args.time_file), ("--stats_file", args.stats_file)):
        if name:
            path = Path(name)
            if path.is_dir():
                raise GenerationError(f"{flag} {path}: is a folder")
            parent = path.parent
            if not parent.is_dir():
                raise GenerationError(f"{flag} {path}: folder {parent} does not exist")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise GenerationError(f"{flag} {path}: folder {parent} is not writable")


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


# -- model ---------------------------------------------------------------------------------
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


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and PyTorch's (every device's) random generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def precision_context(args: argparse.Namespace, device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast as the original (fp16 on CUDA, bf16 on the CPU; bf16 everywhere with --bf16), or nothing."""
    if args.precision == "autocast" or args.bf16:
        return torch.autocast(device.type, dtype=torch.bfloat16 if args.bf16 else None)
    return contextlib.nullcontext()


def vae_slice_size(args: argparse.Namespace, height: int, width: int) -> int:
    return args.vae_slice_size or max(1, VAE_SLICE_PIXELS // (height * width))


def decode_latents(model: torch.nn.Module, z: torch.Tensor, slice_size: int) -> torch.Tensor:
    """Decoded images in [0, 1] on the CPU, at most ``slice_size`` latents per decoder call."""
    parts = []
    for i in range(0, z.shape[0], slice_size):
        x = model.decode_first_stage(z[i : i + slice_size])
        x = torch.clamp((x + 1.0) / 2.0, min=0.0, max=1.0).cpu()
        parts.append(x.float() if x.dtype == torch.bfloat16 else x)  # NumPy has no bfloat16
    return torch.cat(parts)


# -- images --------------------------------------------------------------------------------
def to_uint8(image: torch.Tensor) -> np.ndarray:
    """(3, h, w) in [0, 1] to an (h, w, 3) uint8 array, truncating as the original does."""
    return (255.0 * image.numpy().transpose(1, 2, 0)).astype(np.uint8)


def make_grid(images: Sequence[np.ndarray], nrow: int, padding: int = 2) -> np.ndarray:
    """Images in rows of ``nrow`` with a black ``padding`` border, as torchvision's make_grid
    (which returns a single image unpadded)."""
    if len(images) == 1:
        return images[0]
    h, w, c = images[0].shape
    cols = min(nrow, len(images))
    rows = math.ceil(len(images) / cols)
    grid = np.zeros((rows * (h + padding) + padding, cols * (w + padding) + padding, c), dtype=np.uint8)
    for i, image in enumerate(images):
        y, x = (i // cols) * (h + padding) + padding, (i % cols) * (w + padding) + padding
        grid[y : y + h, x : x + w] = image
    return grid


class Watermarker:
    """The original's invisible watermark ("SDV2", dwtDct) via invisible-watermark, when installed."""

    def __init__(self, enabled: bool):
        self.encoder = None
        self._warned_small = False
        if not enabled:
            return
        try:
            from imwatermark import WatermarkEncoder
        except ImportError:
            logger.warning("invisible-watermark is not installed: images are not watermarked (pip install invisible-watermark)")
            return
        self.encoder = WatermarkEncoder()
        self.encoder.set_watermark("bytes", WATERMARK.encode("utf-8"))

    def __call__(self, array: np.ndarray) -> np.ndarray:
        if self.encoder is None:
            return array
        if array.shape[0] * array.shape[1] < WATERMARK_MIN_PIXELS:
            if not self._warned_small:
                logger.warning("images below 256x256 pixels cannot carry the invisible watermark: not watermarked")
                self._warned_small = True
            return array
        bgr = np.ascontiguousarray(array[:, :, ::-1])
        return np.ascontiguousarray(self.encoder.encode(bgr, "dwtDct")[:, :, ::-1])


def next_number(folder: Path, pattern: re.Pattern) -> int:
    """One more than the highest number of the files of ``pattern`` in ``folder``."""
    numbers = [int(m.group(1)) for name in os.listdir(folder) if (m := pattern.match(name))]
    return max(numbers, default=-1) + 1


class ImageWriter:
    """Saves numbered PNGs with their generation parameters as text chunks, never overwriting.

    Folders are created at the first save, so a run that fails before it leaves nothing behind.
    """

    def __init__(self, outdir: Path, watermark: Watermarker, metadata: dict[str, str]):
        self.outdir = outdir
        self.sample_dir = outdir / "samples"
        self.watermark = watermark
        self.metadata = metadata
        self.saved: list[Path] = []
        self._next: dict[Path, int] = {}

    def _save(self, array: np.ndarray, folder: Path, pattern: re.Pattern, name: str, extra: dict[str, Any]) -> Path:
        info = PngImagePlugin.PngInfo()
        for key, value in {**self.metadata, **extra}.items():
            info.add_text(key, str(value))
        image = Image.fromarray(self.watermark(array))
        if folder not in self._next:
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise GenerationError(f"--outdir {self.outdir}: cannot create {folder}: {e.strerror or e}") from None
            self._next[folder] = next_number(folder, pattern)
        while True:
            path = folder / name.format(self._next[folder])
            self._next[folder] += 1
            try:
                with atomic_path(path) as tmp:
                    image.save(tmp, format="PNG", pnginfo=info)
                return path
            except FileExistsError:  # written by another run meanwhile: take the next number
                continue

    def sample(self, array: np.ndarray, **extra: Any) -> Path:
        path = self._save(array, self.sample_dir, SAMPLE_NAME, "{:05}.png", extra)
        self.saved.append(path)
        return path

    def grid(self, arrays: Sequence[np.ndarray], nrow: int, prompts: Sequence[str]) -> Path:
        prompt = "\n".join(dict.fromkeys(prompts))
        return self._save(make_grid(arrays, nrow), self.outdir, GRID_NAME, "grid-{:04}.png", {"prompt": prompt})


# -- the run -------------------------------------------------------------------------------
@dataclass
class Job:
    """Everything a run needs, resolved and checked."""

    kind: str
    args: argparse.Namespace
    device: torch.device
    files: ModelFiles
    config: DictConfig
    batches: list[list[str]]
    height: int
    width: int
    latent_shape: tuple[int, int, int]
    init_image: torch.Tensor | None = None
    model: Any = None
    sampler: Any = None
    sampler_name: str = ""

    @property
    def t_enc(self) -> int:
        """img2img: the DDIM step the init latent is noised to, and the steps then denoised.

        At most steps - 1: the schedule has no step ``steps`` (the original fails at strength 1.0).
        """
        return min(int(self.args.strength * self.args.steps), self.args.steps - 1)

    @property
    def steps_per_batch(self) -> int:
        return self.t_enc if self.kind == "img2img" else self.args.steps


def prepare(args: argparse.Namespace, kind: str) -> Job:
    """Check every input and resolve the run's settings; loads nothing heavy, writes nothing."""
    check_flags(args)
    files = resolve_model_files(args)
    if files.demo:
        print(
            f"Using the demo model ({_shown(DEMO_CONFIG)}, prompts like {DEMO_PROMPT!r}); for Stable Diffusion 2 pass "
            f"--config {SD2_CONFIG} --ckpt PATH/TO/v2-1_512-ema-pruned.ckpt"
        )
    config = read_config(files.config)
    geometry = model_geometry(config, files.config)
    check_latent_flags(args, geometry)
    init_image = None
    if kind == "img2img":
        init_image = load_init_image(args.init_img, geometry.multiple)
        height, width = init_image.shape[2:]
    else:
        height, width = image_size(args, geometry)
    max_steps = int(config.model.params.get("timesteps", 1000))
    if args.steps > max_steps:
        raise UsageError(f"--steps {args.steps}: the model's schedule has {max_steps} timesteps, at most that many steps")
    default_prompt = DEMO_PROMPT if files.demo else DEFAULT_PROMPTS[kind]
    batches = read_prompts(args, default_prompt)
    check_output_paths(args)
    f = geometry.vae_factor
    return Job(kind, args, torch.device(args.device), files, config, batches, height, width,
               (geometry.channels, height // f, width // f), init_image)


def setup_model(job: Job) -> None:
    """Load the model, choose its attention kernel and sampler, compile its UNet."""
    args = job.args
    if args.compile:
        check_compile(job.device)
    model = load_model(job.files, job.config, job.device)
    if set_attention_implementation(model, args.attention) == 0 and args.attention != "sdpa":
        logger.warning("--attention %s has no effect: this model's attention is nn.MultiheadAttention (native-MHA layout)", args.attention)
    sampler, name = make_sampler(model, args, job.device)
    if name != "dpm":  # DDIM and PLMS: find a step count the schedule cannot take now, not mid-run
        try:
            sampler.make_schedule(ddim_num_steps=args.steps, ddim_eta=args.ddim_eta, verbose=False)
        except (IndexError, ValueError) as e:
            raise UsageError(f"--steps {args.steps}: {e}") from None
    if job.kind == "img2img":
        logger.info("img2img: the init image is noised by %d of %d steps, then denoised", job.t_enc, args.steps)
    if args.compile:
        model.model.diffusion_model.compile(mode=args.compile_mode or "default")
    job.model, job.sampler, job.sampler_name = model, sampler, name


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_batch_fn(job: Job) -> Callable[[list[str]], torch.Tensor]:
    """Draw the run's fixed random inputs (the seed is set just before) and return the function
    that turns a prompt batch into decoded images: text encoding, sampling and VAE decoding."""
    args, model, sampler, device = job.args, job.model, job.sampler, job.device
    n = args.n_samples
    slice_size = vae_slice_size(args, job.height, job.width)
    if job.kind == "img2img":
        # Encoded once; the posterior is sampled for the whole batch as the original does.
        parameters = model.encode_first_stage(job.init_image.to(device)).parameters
        posterior = DiagonalGaussianDistribution(parameters.expand(n, -1, -1, -1))
        init_latent = model.get_first_stage_encoding(posterior)
        noise = torch.randn_like(init_latent) if args.fixed_code else None
    else:
        start_code = torch.randn([n, *job.latent_shape], device=device) if args.fixed_code else None

    def latents(prompts: list[str], c: Any, uc: Any) -> torch.Tensor:
        b = len(prompts)
        if job.kind == "img2img":
            t = torch.tensor([job.t_enc] * b).to(device)
            z = sampler.stochastic_encode(init_latent[:b], t, noise=None if noise is None else noise[:b])
            return sampler.decode(z, c, job.t_enc, unconditional_guidance_scale=args.scale, unconditional_conditioning=uc)
        samples, _ = sampler.sample(
            S=args.steps, conditioning=c, batch_size=b, shape=list(job.latent_shape), verbose=False,
            unconditional_guidance_scale=args.scale, unconditional_conditioning=uc, eta=args.ddim_eta,
            x_T=None if start_code is None else start_code[:b],
        )
        return samples

    def batch(prompts: list[str]) -> torch.Tensor:
        uc = model.get_learned_conditioning(len(prompts) * [""]) if args.scale != 1.0 else None
        c = model.get_learned_conditioning(prompts)
        return decode_latents(model, latents(prompts, c, uc), slice_size)

    return batch


@dataclass
class Timing:
    seconds: float = 0.0
    images: int = 0
    batches: int = 0
    peak_gpu_memory_bytes: int | None = None
    grid: Path | None = None


def generate(job: Job, writer: ImageWriter) -> Timing:
    """Warm up (--skip_first), seed, then the n_iter timed iterations; images are saved untimed."""
    args, device = job.args, job.device
    timing = Timing()
    grid_images: list[np.ndarray] = []
    with torch.no_grad(), sdpa_backends(args.disable_flash, args.disable_mem_efficient, args.disable_math), job.model.ema_scope():
        if args.skip_first:
            seed_everything(args.seed)
            batch = make_batch_fn(job)
            sizes = {len(p): p for p in job.batches}  # one batch of each size: what compilation needs
            with precision_context(args, device):
                for prompts in tqdm(list(sizes.values()), desc="Warm-up"):
                    batch(prompts)
        seed_everything(args.seed)  # after loading and warm-up: the images do not depend on either
        batch = make_batch_fn(job)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        with precision_context(args, device):
            for iteration in trange(args.n_iter, desc="Sampling"):
                for prompts in tqdm(job.batches, desc="data"):
                    _sync(device)
                    start = time.perf_counter()
                    images = batch(prompts)
                    _sync(device)
                    timing.seconds += time.perf_counter() - start
                    timing.batches += 1
                    for index, (image, prompt) in enumerate(zip(images, prompts)):
                        array = to_uint8(image)
                        writer.sample(array, prompt=prompt, iteration=iteration, batch_index=index)
                        grid_images.append(array)
                        timing.images += 1
        if device.type == "cuda":
            timing.peak_gpu_memory_bytes = torch.cuda.max_memory_allocated(device)
    prompts = [p for b in job.batches for p in b]
    timing.grid = writer.grid(grid_images, args.n_rows or args.n_samples, prompts)
    return timing


def image_metadata(job: Job) -> dict[str, str]:
    """The text chunks every PNG carries, enough to rerun it (with its iteration and batch index)."""
    args = job.args
    meta = {
        "negative_prompt": "",
        "seed": args.seed,
        "sampler": job.sampler_name,
        "steps": args.steps,
        "scale": args.scale,
        "size": f"{job.width}x{job.height}",
        "eta": args.ddim_eta,
        "n_samples": args.n_samples,
        "fixed_code": args.fixed_code,
        "precision": "bf16" if args.bf16 else args.precision,
        "config": job.files.config.name,
        "checkpoint": job.files.ckpt.name if job.files.ckpt else "random weights",
        "software": f"ldm-sd2 {job.kind}",
    }
    if job.kind == "img2img":
        meta.update(init_image=Path(args.init_img).name, strength=args.strength)
    return {k: str(v) for k, v in meta.items()}


def device_name(device: torch.device) -> str:
    return f"cuda ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "cpu"


def write_results(job: Job, timing: Timing) -> None:
    args = job.args
    if args.time_file:
        write_text(args.time_file, f"{timing.seconds:.6f}\n", overwrite=True)
    if args.stats_file:
        stats = {
            "seconds": timing.seconds,
            "seconds_per_image": timing.seconds / timing.images,
            "images": timing.images,
            "iterations_per_second": timing.batches * job.steps_per_batch / timing.seconds,
            "peak_gpu_memory_bytes": timing.peak_gpu_memory_bytes,
            "device": device_name(job.device),
            "torch": torch.__version__,
            "script": job.kind,
            "sampler": job.sampler_name,
            "steps": args.steps,
            "H": job.height,
            "W": job.width,
            "n_samples": args.n_samples,
            "n_iter": args.n_iter,
            "precision": "bf16" if args.bf16 else args.precision,
            "attention": args.attention,
            "sdpa_disabled": [n for n in ("flash", "mem_efficient", "math") if getattr(args, f"disable_{n}")],
            "compile": (args.compile_mode or "default") if args.compile else False,
            "vae_slice_size": vae_slice_size(args, job.height, job.width),
        }
        write_text(args.stats_file, json.dumps(stats, indent=2) + "\n", overwrite=True)


def run(args: argparse.Namespace, kind: str) -> None:
    job = prepare(args, kind)
    setup_model(job)
    writer = ImageWriter(Path(args.outdir), Watermarker(not args.no_watermark), image_metadata(job))
    try:
        timing = generate(job, writer)
    except OSError as e:  # a full disk, a folder removed meanwhile: the images written so far are complete
        raise GenerationError(f"writing the output failed: {e}") from None
    except RuntimeError as e:
        message = str(e)
        if "No available kernel" in message or "No viable backend" in message:
            raise GenerationError(f"the SDPA backends left enabled cannot run this model's attention on {job.device.type}: {message.splitlines()[0]}") from None
        if args.compile and type(e).__module__.startswith(("torch._dynamo", "torch._inductor")):
            raise GenerationError(f"torch.compile failed on the UNet: {message.strip().splitlines()[0]}") from None
        raise
    write_results(job, timing)
    first, last = writer.saved[0].name, writer.saved[-1].name
    names = first if first == last else f"{first} to {last}"
    plural = "s" if timing.images != 1 else ""
    print(
        f"{timing.images} image{plural} in {writer.sample_dir} ({names}), grid {timing.grid}; "
        f"{timing.seconds / timing.images:.3f} s/image, {timing.batches * job.steps_per_batch / timing.seconds:.2f} it/s"
    )


@contextlib.contextmanager
def cli_logging() -> Iterator[None]:
    """Warnings (too-long prompts among them) and this package's info lines on stderr, kept clear of
    the progress bars; left alone when the caller (a test runner, an application) configured logging."""
    root = logging.getLogger()
    if root.handlers:
        yield
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    package = logging.getLogger("ldm")
    old_root, old_package = root.level, package.level
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    package.setLevel(logging.INFO)
    try:
        with logging_redirect_tqdm():
            yield
    finally:
        root.removeHandler(handler)
        root.setLevel(old_root)
        package.setLevel(old_package)


def main(argv: Sequence[str] | None = None, kind: str = "txt2img") -> int:
    """The command line of ``kind`` ("txt2img" or "img2img"); returns the exit status."""
    parser = build_parser(kind)
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, or argparse's own usage error (already printed)
        return int(e.code or 0)
    with cli_logging():
        try:
            run(args, kind)
        except UsageError as e:
            print(f"{parser.prog}: error: {e}", file=sys.stderr)
            return 2
        except GenerationError as e:
            print(f"{parser.prog}: error: {e}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print(f"{parser.prog}: interrupted (images written so far are complete)", file=sys.stderr)
            return 130
    return 0
