"""A run of any task: seeding, the warm-up, the timed loop, the results files and ``main``."""

from __future__ import annotations

import contextlib
import json
import logging
import random
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm, trange
from tqdm.contrib.logging import logging_redirect_tqdm

from ldm.devices import device_name, synchronize
from ldm.fileio import write_text
from ldm.generation.errors import GenerationError, UsageError
from ldm.generation.images import ImageWriter, Watermarker, to_uint8
from ldm.generation.memory import check_fits
from ldm.generation.model import REPO_ROOT, SD2_CONFIG, Model
from ldm.generation.options import DEMO_PROMPT, build_parser, check_latent_flags, check_output_paths, read_prompts, settings_from_args
from ldm.generation.pipeline import NonFiniteError, Pipeline
from ldm.generation.settings import OutputSettings

logger = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and PyTorch's (every device's) random generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class Timing:
    seconds: float = 0.0
    images: int = 0
    batches: int = 0
    peak_gpu_memory_bytes: int | None = None
    grid: Path | None = None


def generate(pipeline: Pipeline, batches: list[list[str]], output: OutputSettings, writer: ImageWriter) -> Timing:
    """Warm up (``skip_first``), seed, then the ``n_iter`` timed iterations; images are saved untimed.

    The images depend on the seed only, not on the warm-up or on how the model was loaded.
    """
    model, device, seed = pipeline.model, pipeline.model.device, pipeline.sampling.seed
    net = model.load()
    timing = Timing()
    grid_images: list[np.ndarray] = []
    with torch.no_grad(), model.backends(), net.ema_scope():
        if output.skip_first:
            seed_everything(seed)
            sizes = {len(p): p for p in batches}  # one batch of each size: what compilation needs
            with model.precision():
                pipeline.start()
                for prompts in tqdm(list(sizes.values()), desc="Warm-up"):
                    pipeline(prompts)
        seed_everything(seed)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        with model.precision():
            pipeline.start()
            for iteration in trange(output.n_iter, desc="Sampling"):
                for number, prompts in enumerate(tqdm(batches, desc="data")):
                    synchronize(device)
                    start = time.perf_counter()
                    try:
                        images = pipeline(prompts)
                    except NonFiniteError as e:
                        n = timing.images
                        written = f"; the {n} image{'s' * (n != 1)} written before it {'are' if n != 1 else 'is'} kept" if n else ""
                        raise NonFiniteError(f"iteration {iteration + 1}, batch {number + 1} ({prompts[0]!r}): {e}{written}") from None
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
    timing.grid = writer.grid(grid_images, output.n_rows or pipeline.n_samples, [p for b in batches for p in b])
    return timing


def image_metadata(pipeline: Pipeline) -> dict[str, str]:
    """The text chunks every PNG carries, enough to rerun it (with its iteration and batch index)."""
    s, files = pipeline.sampling, pipeline.model.files
    meta = {
        "negative_prompt": "",
        "seed": s.seed,
        "sampler": s.sampler,
        "steps": s.steps,
        "scale": s.scale,
        "size": f"{pipeline.width}x{pipeline.height}",
        "eta": s.eta,
        "n_samples": pipeline.n_samples,
        "fixed_code": s.fixed_code,
        "precision": pipeline.model.settings.precision,
        "config": files.config.name,
        "checkpoint": files.ckpt.name if files.ckpt else "random weights",
        "software": f"ldm-sd2 {pipeline.task}",
        **pipeline.metadata(),
    }
    return {k: str(v) for k, v in meta.items()}


def run_stats(pipeline: Pipeline, output: OutputSettings, timing: Timing) -> dict:
    settings = pipeline.model.settings
    return {
        "seconds": timing.seconds,
        "seconds_per_image": timing.seconds / timing.images,
        "images": timing.images,
        "iterations_per_second": timing.batches * pipeline.steps_per_batch / timing.seconds,
        "peak_gpu_memory_bytes": timing.peak_gpu_memory_bytes,
        "device": device_name(pipeline.model.device),
        "torch": torch.__version__,
        "script": pipeline.task,
        "sampler": pipeline.sampling.sampler,
        "steps": pipeline.sampling.steps,
        "H": pipeline.height,
        "W": pipeline.width,
        "n_samples": pipeline.n_samples,
        "n_iter": output.n_iter,
        "precision": settings.precision,
        "attention": settings.attention,
        "sdpa_disabled": [n for n in ("flash", "mem_efficient", "math") if getattr(settings, f"disable_{n}")],
        "compile": (settings.compile_mode or "default") if settings.compile else False,
        "vae_slice_size": pipeline.vae_slice_size,
    }


def _shown(path: Path) -> str:
    """``path`` relative to the repository when inside it."""
    return str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else str(path)


def _out_of_memory(error: BaseException) -> bool:
    """CUDA's OOM error, or the CPU allocator's failure (a plain RuntimeError)."""
    text = str(error)
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and ("DefaultCPUAllocator" in text or "not enough memory" in text)
    )


def run(args, task: str) -> None:
    """Check every input, then load, generate and write; ``args`` are the parsed flags of ``task``."""
    from ldm.generation.tasks import TASKS

    model_settings, sampling, output = settings_from_args(args)
    task_class = TASKS[task]
    if model_settings.config is None and Path(task_class.family_config) != SD2_CONFIG:
        # Another family: its own config by default, and no demo model to fall back on.
        config = Path(task_class.family_config)
        model_settings.config = config if config.exists() else REPO_ROOT / config
        if model_settings.ckpt is None and not model_settings.random_weights:
            raise GenerationError(f"--ckpt is required for {task}: pass its checkpoint (with --config {task_class.family_config})")
    model = Model(model_settings)
    if model.files.demo:
        print(
            f"Using the demo model ({_shown(model.files.config)}, prompts like {DEMO_PROMPT!r}); for Stable Diffusion 2 pass "
            f"--config {SD2_CONFIG} --ckpt PATH/TO/v2-1_512-ema-pruned.ckpt"
        )
    check_latent_flags(args, model.geometry)
    pipeline = task_class.from_args(model, sampling, output.n_samples, output.vae_slice_size, args)
    default_prompt = DEMO_PROMPT if model.files.demo else pipeline.default_prompt
    batches = read_prompts(args.prompt, args.from_file, output.n_samples, default_prompt, args.repeat)
    check_output_paths(output)
    pipeline.vae_tile_size = args.vae_tile_size
    check_fits(pipeline, guided=sampling.scale != 1.0)
    if hasattr(pipeline, "t_enc"):
        logger.info("%s: the init image is noised by %d of %d steps, then denoised", task, pipeline.t_enc, sampling.steps)
    writer = ImageWriter(output.outdir, Watermarker(output.watermark), image_metadata(pipeline))
    try:
        model.load()
        timing = generate(pipeline, batches, output, writer)
    except OSError as e:  # a full disk, a folder removed meanwhile: the images written so far are complete
        raise GenerationError(f"writing the output failed: {e}") from None
    except (torch.OutOfMemoryError, RuntimeError) as e:
        if _out_of_memory(e):
            raise GenerationError(
                f"out of {model.device.type.upper()} memory at {pipeline.width}x{pipeline.height}, --n_samples {output.n_samples}: "
                "lower --n_samples or the size, or --vae_slice_size if it failed while decoding"
            ) from None
        message = str(e)
        if "No available kernel" in message or "No viable backend" in message:
            raise GenerationError(f"the SDPA backends left enabled cannot run this model's attention on {model.device.type}: {message.splitlines()[0]}") from None
        if model_settings.compile and type(e).__module__.startswith(("torch._dynamo", "torch._inductor")):
            raise GenerationError(f"torch.compile failed on the UNet: {message.strip().splitlines()[0]}") from None
        raise
    if output.time_file:
        write_text(output.time_file, f"{timing.seconds:.6f}\n", overwrite=True)
    if output.stats_file:
        write_text(output.stats_file, json.dumps(run_stats(pipeline, output, timing), indent=2) + "\n", overwrite=True)
    first, last = writer.saved[0].name, writer.saved[-1].name
    names = first if first == last else f"{first} to {last}"
    plural = "s" if timing.images != 1 else ""
    print(
        f"{timing.images} image{plural} in {writer.sample_dir} ({names}), grid {timing.grid}; "
        f"{timing.seconds / timing.images:.3f} s/image, {timing.batches * pipeline.steps_per_batch / timing.seconds:.2f} it/s"
    )


class Terminated(Exception):
    """SIGTERM arrived (SLURM, Kubernetes and torchrun stop jobs with it)."""


@contextlib.contextmanager
def sigterm_as_exception() -> Iterator[None]:
    """Turn SIGTERM into :class:`Terminated` in the main thread, so a run stops as on Ctrl-C:
    between two writes (each file is written atomically), with a message and a non-zero status."""

    def handler(signum, frame):
        raise Terminated()

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals to the application
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


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


def main(argv: Sequence[str] | None = None, task: str = "txt2img") -> int:
    """The command line of ``task`` (a name in ``ldm.generation.tasks.TASKS``); returns the exit status."""
    parser = build_parser(task)
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, or argparse's own usage error (already printed)
        return int(e.code or 0)
    with cli_logging(), sigterm_as_exception():
        try:
            run(args, task)
        except UsageError as e:
            print(f"{parser.prog}: error: {e}", file=sys.stderr)
            return 2
        except GenerationError as e:
            print(f"{parser.prog}: error: {e}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print(f"{parser.prog}: interrupted (images written so far are complete)", file=sys.stderr)
            return 130
        except Terminated:
            print(f"{parser.prog}: terminated by SIGTERM (images written so far are complete)", file=sys.stderr)
            return 128 + signal.SIGTERM
    return 0
