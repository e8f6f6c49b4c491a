"""The command line: flags and their checks, prompt reading, image size and output-path checks."""

from __future__ import annotations

import argparse
import logging
import math
import os
from pathlib import Path
from typing import Callable

import torch

from ldm.generation.errors import GenerationError, UsageError
from ldm.generation.model import SD2_CONFIG, Geometry
from ldm.modules.attention import IMPLEMENTATIONS, check_implementation

logger = logging.getLogger(__name__)

DEMO_PROMPT = "a red circle"
DEFAULT_PROMPTS = {
    "txt2img": "a professional photograph of an astronaut riding a triceratops",
    "img2img": "a painting of a virus monster playing guitar",
}
VAE_SLICE_PIXELS = 4 * 512 * 512  # automatic --vae_slice_size: about 1 Mpixel per decoder call


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
                   help="classifier-free guidance scale: eps = eps(x, empty) + scale * (eps(x, cond) - eps(x, empty)) (default: %(default)s)")
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


def vae_slice_size(args: argparse.Namespace, height: int, width: int) -> int:
    return args.vae_slice_size or max(1, VAE_SLICE_PIXELS // (height * width))
