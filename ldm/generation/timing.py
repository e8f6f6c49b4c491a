"""Timed runs of any task straight from typed settings, each in a child process: what
``scripts/benchmark.py`` runs for each of its own configurations (no command line is rebuilt).

The child is started with multiprocessing's ``spawn`` context (a fresh interpreter: no state
inherited from the parent's PyTorch) and makes itself a session leader, so that at the time limit
the parent ends it together with inductor's compile workers (``os.killpg``). Its output goes to a
log file; its results to ``stats.json`` in its folder. Image tasks get synthetic inputs (a seeded
noise picture, and a centred square mask for inpainting), written as PNGs into the run's folder.
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing
import os
import signal
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

STATS = "stats.json"


@dataclass
class TimedRun:
    """One timed run: the model's settings (``ldm.generation.ModelSettings`` fields), the task and its
    size, and the run's folder. ``n_iter`` timed batches follow one untimed warm-up (compilation)."""

    model: dict[str, Any]
    outdir: str
    task: str = "txt2img"
    prompt: str = "A photo"
    n_samples: int = 1
    n_iter: int = 2
    height: int = 512
    width: int = 512
    sampling: dict[str, Any] = field(default_factory=lambda: {"sampler": "plms", "steps": 50, "seed": 1})
    cpu_threads: int | None = None


def synthetic_image(path: Path, height: int, width: int, seed: int = 0) -> Path:
    """A seeded RGB noise picture, smoothed a little so that it is not pure noise, as a PNG."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(max(1, height // 8), max(1, width // 8), 3), dtype=np.uint8)
    Image.fromarray(small).resize((width, height), Image.BILINEAR).save(path)
    return path


def synthetic_mask(path: Path, height: int, width: int) -> Path:
    """White (repaint) in the centred half-size square, black elsewhere, as a PNG."""
    from PIL import Image

    mask = np.zeros((height, width), dtype=np.uint8)
    mask[height // 4 : height - height // 4, width // 4 : width - width // 4] = 255
    Image.fromarray(mask).save(path)
    return path


def synthetic_pipeline(task: str, model: Any, sampling: Any, n_samples: int, height: int, width: int, folder: Path) -> Any:
    """The pipeline of ``task`` on ``model`` at ``height`` x ``width`` output pixels, with synthetic
    input pictures in ``folder`` for the image tasks (the upscaler's is a quarter of the size)."""
    from ldm.generation.tasks import TASKS

    cls = TASKS[task]
    if task == "txt2img":
        return cls(model, sampling, n_samples, height, width)
    folder.mkdir(parents=True, exist_ok=True)
    if task == "upscale":
        return cls(model, sampling, synthetic_image(folder / "input.png", height // 4, width // 4), n_samples=n_samples)
    image = synthetic_image(folder / "input.png", height, width)
    if task == "inpaint":
        return cls(model, sampling, image, synthetic_mask(folder / "mask.png", height, width), n_samples=n_samples)
    if task == "variations":
        return cls(model, sampling, image, n_samples=n_samples, height=height, width=width)
    return cls(model, sampling, image, n_samples=n_samples)  # img2img, depth2img


def execute(run: TimedRun) -> dict[str, Any]:
    """Load, warm up (untimed: compilation happens here) and time ``run``; the statistics of
    ``ldm.generation.run.run_stats`` plus load, warm-up and whole-process seconds."""
    import torch

    from ldm.generation.images import ImageWriter, Watermarker
    from ldm.generation.model import Model
    from ldm.generation.run import generate, image_metadata, run_stats, seed_everything
    from ldm.generation.settings import ModelSettings, OutputSettings, SamplingSettings

    if run.cpu_threads:
        torch.set_num_threads(run.cpu_threads)
    outdir = Path(run.outdir)
    model = Model(ModelSettings(**run.model))
    sampling = SamplingSettings(**run.sampling)
    pipeline = synthetic_pipeline(run.task, model, sampling, run.n_samples, run.height, run.width, outdir / "inputs")
    prompts = run.n_samples * [run.prompt]
    output = OutputSettings(outdir=outdir, n_samples=run.n_samples, n_iter=run.n_iter, watermark=False)
    start = time.perf_counter()
    net = model.load()
    load_seconds = time.perf_counter() - start
    with torch.no_grad(), model.backends(), net.ema_scope(), model.precision():
        seed_everything(sampling.seed)
        pipeline.start()
        start = time.perf_counter()
        pipeline(prompts)
        warmup_seconds = time.perf_counter() - start
    writer = ImageWriter(outdir, Watermarker(False), image_metadata(pipeline))
    timing = generate(pipeline, [prompts], replace(output, skip_first=False), writer)
    stats = run_stats(pipeline, output, timing)
    stats.update(task=run.task, computes_in=model.computes_in, load_seconds=load_seconds, warmup_seconds=warmup_seconds,
                 model_settings={k: str(v) if isinstance(v, Path) else v for k, v in run.model.items()})
    return stats


def child(run: TimedRun, log_path: str) -> None:
    """The child's entry: its own session, output into ``log_path``, results into ``stats.json``;
    exit status 0, or 1 after printing the error (its last line is what the benchmark reports)."""
    os.setsid()
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", force=True)
    try:
        stats = execute(run)
    except BaseException as e:  # noqa: BLE001 - reported through the log and the exit status
        traceback.print_exc()
        lines = str(e).strip().splitlines()
        print(f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__, flush=True)
        os._exit(1)
    from ldm.fileio import write_text

    write_text(Path(run.outdir) / STATS, json.dumps(stats, indent=2) + "\n", overwrite=True)
    print(f"{stats['images']} images, {stats['seconds']:.3f} s timed", flush=True)


@contextlib.contextmanager
def _thread_environment(threads: int | None):
    """OMP/MKL thread counts for a child about to start (it reads them when it imports torch)."""
    if not threads:
        yield
        return
    saved = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    os.environ.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_in_child(run: TimedRun, log_path: Path, timeout: float | None = None) -> tuple[int | None, float, str]:
    """Run ``run`` in a spawned child process; returns (exit status, or None when it was killed at
    ``timeout`` seconds, wall seconds, the log). On a timeout or Ctrl-C the child's whole session
    (its compile workers included) is killed."""
    log_path = Path(log_path)
    Path(run.outdir).mkdir(parents=True, exist_ok=True)
    log_path.write_text(json.dumps(asdict(run), indent=1, default=str) + "\n\n")
    context = multiprocessing.get_context("spawn")
    process = context.Process(target=child, args=(run, str(log_path)), daemon=False)
    start = time.perf_counter()
    with _thread_environment(run.cpu_threads):
        process.start()
    returncode = None
    try:
        process.join(timeout)
        returncode = process.exitcode
    finally:
        if returncode is None:  # at the time limit, or interrupted: the child's session goes with it
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
            process.kill()  # in case it had not yet made its own session
            process.join()
    wall = time.perf_counter() - start
    return returncode, wall, log_path.read_text(errors="replace")
