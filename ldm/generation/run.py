"""A run: checked settings, model and sampler setup, seeding, the timed loop, results files and ``main``."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm, trange
from tqdm.contrib.logging import logging_redirect_tqdm

from ldm.devices import device_name, synchronize
from ldm.fileio import write_text
from ldm.generation.errors import GenerationError, UsageError
from ldm.generation.images import ImageWriter, Watermarker, load_init_image, to_uint8
from ldm.generation.model import (
    REPO_ROOT, SD2_CONFIG, ModelFiles, check_compile, load_model, make_sampler, model_geometry, read_config, resolve_model_files,
)
from ldm.generation.options import (
    DEFAULT_PROMPTS, DEMO_PROMPT, build_parser, check_flags, check_latent_flags, check_output_paths, image_size, read_prompts,
    vae_slice_size,
)
from ldm.modules.attention import sdpa_backends, set_attention_implementation
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution

logger = logging.getLogger(__name__)


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


def decode_latents(model: torch.nn.Module, z: torch.Tensor, slice_size: int) -> torch.Tensor:
    """Decoded images in [0, 1] on the CPU, at most ``slice_size`` latents per decoder call."""
    parts = []
    for i in range(0, z.shape[0], slice_size):
        x = model.decode_first_stage(z[i : i + slice_size])
        x = torch.clamp((x + 1.0) / 2.0, min=0.0, max=1.0).cpu()
        parts.append(x.float() if x.dtype == torch.bfloat16 else x)  # NumPy has no bfloat16
    return torch.cat(parts)


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
        """UNet steps one batch takes: a uniform DDIM/PLMS grid of S steps can hold S + 1."""
        if self.kind == "img2img":
            return self.t_enc
        timesteps = getattr(self.sampler, "ddim_timesteps", None)
        return len(timesteps) if timesteps is not None else self.args.steps


def _shown(path: Path) -> str:
    """``path`` relative to the repository when inside it."""
    return str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else str(path)


def prepare(args: argparse.Namespace, kind: str) -> Job:
    """Check every input and resolve the run's settings; loads nothing heavy, writes nothing."""
    check_flags(args)
    files = resolve_model_files(args)
    if files.demo:
        print(
            f"Using the demo model ({_shown(files.config)}, prompts like {DEMO_PROMPT!r}); for Stable Diffusion 2 pass "
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
    elif args.steps < 2:
        raise UsageError(f"--steps {args.steps}: DPM-Solver++ (2M) needs at least 2 steps")
    if job.kind == "img2img":
        logger.info("img2img: the init image is noised by %d of %d steps, then denoised", job.t_enc, args.steps)
    if args.compile:
        model.model.diffusion_model.compile(mode=args.compile_mode or "default")
    job.model, job.sampler, job.sampler_name = model, sampler, name


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
                    synchronize(device)
                    start = time.perf_counter()
                    images = batch(prompts)
                    synchronize(device)
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
    except torch.OutOfMemoryError:
        raise GenerationError(
            f"out of {job.device.type.upper()} memory at --n_samples {args.n_samples}: lower --n_samples, "
            "or --vae_slice_size if it failed while decoding"
        ) from None
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
