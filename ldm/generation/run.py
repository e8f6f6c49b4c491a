"""A run of any task: seeding, the warm-up, the timed loop, the results files and ``main``."""

from __future__ import annotations

import contextlib
import json
import logging
import random
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from ldm.devices import device_name, synchronize
from ldm.fileio import write_text
from ldm.generation import distributed
from ldm.generation.control import controls_from_args
from ldm.generation.distributed import Outcome, Plan, Session, Unit, batch_seed, job_units
from ldm.generation.errors import GenerationError, UsageError
from ldm.generation.images import SAMPLE_NAME, ImageWriter, Watermarker, next_number, to_uint8
from ldm.generation.memory import check_fits
from ldm.generation.model import REPO_ROOT, SD2_CONFIG, Model
from ldm.generation.options import (
    DEMO_PROMPT, build_parser, check_latent_flags, check_output_paths, model_settings_from_args, output_settings_from_args,
    read_prompts, sampling_from_args,
)
from ldm.generation.pipeline import NonFiniteError, Pipeline
from ldm.generation.settings import OutputSettings

logger = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and PyTorch's (every device's) random generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextlib.contextmanager
def inference(model: Model) -> Iterator[torch.nn.Module]:
    """The contexts every generation runs in (no gradients, the SDPA backends, the EMA weights),
    with the model loaded; the caller enters the precision context (per phase, in :func:`generate`)."""
    net = model.load()
    with torch.no_grad(), model.backends(), net.ema_scope():
        yield net


def render(pipeline: Pipeline, prompts: list[str]) -> torch.Tensor:
    """One seeded batch, the images the first batch of :func:`generate` gives for the same settings."""
    with inference(pipeline.model), pipeline.model.precision():
        seed_everything(pipeline.sampling.seed)
        pipeline.start()
        return pipeline(prompts)


@dataclass
class Timing:
    seconds: float = 0.0
    images: int = 0
    batches: int = 0
    peak_gpu_memory_bytes: int | None = None
    grid: Path | None = None
    shown: list[tuple[int, str, np.ndarray]] = field(default_factory=list, repr=False)  # (global index, prompt, pixels)


@dataclass
class Work:
    """What this process generates, and how: its batches in order, the seed rule and the file
    numbering (:class:`~ldm.generation.distributed.Plan`). The default is the whole job as one
    process runs it: one seeded stream, files numbered after those already there."""

    units: list[Unit]
    plan: Plan = field(default_factory=lambda: Plan("stream", None))
    check_peers: Callable[[], None] = lambda: None  # raises when another process failed
    progress: bool = True


def generate(pipeline: Pipeline, batches: list[list[str]], output: OutputSettings, writer: ImageWriter,
             work: Work | None = None) -> Timing:
    """Warm up (``skip_first``), seed, then the ``n_iter`` timed iterations; images are saved untimed.

    The images depend on the seed only, not on the warm-up or on how the model was loaded. Under
    the batch rule each batch reseeds from (seed, global batch index) and images already on disk
    (``--skip_existing``) are not written again. The grid is left to the caller (``timing.shown``).
    """
    work = work or Work(job_units(batches, output.n_iter))
    model, device, seed = pipeline.model, pipeline.model.device, pipeline.sampling.seed
    timing = Timing()
    if not work.units:
        return timing
    per_iteration: dict[int, list[Unit]] = {}
    for unit in work.units:
        per_iteration.setdefault(unit.iteration, []).append(unit)
    quiet = not work.progress
    with inference(model):
        if output.skip_first:
            seed_everything(seed)
            sizes = {len(u.prompts): list(u.prompts) for u in work.units}  # one batch of each size: what compilation needs
            with model.precision():
                pipeline.start()
                for prompts in tqdm(list(sizes.values()), desc="Warm-up", disable=quiet):
                    pipeline(prompts)
        seed_everything(seed)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        with model.precision():
            pipeline.start()
            for iteration, units in tqdm(per_iteration.items(), desc="Sampling", disable=quiet):
                for unit in tqdm(units, desc="data", disable=quiet):
                    work.check_peers()
                    extra = {}
                    if work.plan.seed_mode == "batch":
                        extra["batch_seed"] = batch_seed(seed, unit.index)
                        seed_everything(extra["batch_seed"])
                        pipeline.reseed(extra["batch_seed"])
                    prompts = list(unit.prompts)
                    synchronize(device)
                    start = time.perf_counter()
                    try:
                        images = pipeline(prompts)
                    except NonFiniteError as e:
                        n = len(writer.saved)
                        written = f"; the {n} image{'s' * (n != 1)} written before it {'are' if n != 1 else 'is'} kept" if n else ""
                        raise NonFiniteError(f"iteration {iteration + 1}, batch {unit.number + 1} ({prompts[0]!r}): {e}{written}") from None
                    synchronize(device)
                    timing.seconds += time.perf_counter() - start
                    timing.batches += 1
                    for index, (image, prompt) in enumerate(zip(images, prompts)):
                        array = to_uint8(image)
                        number = unit.first_image + index
                        if number not in work.plan.existing:
                            writer.sample(array, work.plan.file_number(number), prompt=prompt, iteration=iteration,
                                          batch_index=index, **extra)
                        timing.shown.append((number, prompt, array))
                        timing.images += 1
        if device.type == "cuda":
            timing.peak_gpu_memory_bytes = torch.cuda.max_memory_allocated(device)
    return timing


def image_metadata(pipeline: Pipeline, seed_mode: str = "stream") -> dict[str, str]:
    """The text chunks every PNG carries, enough to rerun it (with its iteration and batch index,
    and under the batch seed rule its ``batch_seed``)."""
    s, files = pipeline.sampling, pipeline.model.files
    meta = {
        "negative_prompt": s.negative_prompt,
        "prompt_syntax": pipeline.model.settings.prompt_syntax,
        **({"embeddings": ", ".join(e.name for e in pipeline.model.embeddings)} if pipeline.model.embeddings else {}),
        "seed": s.seed,
        **({"seed_mode": seed_mode} if seed_mode != "stream" else {}),
        "sampler": s.sampler,
        "schedule": pipeline.schedule,
        "steps": s.steps,
        "scale": s.scale,
        "size": f"{pipeline.width}x{pipeline.height}",
        **({"eta": pipeline.eta} if pipeline.eta is not None else {}),
        "n_samples": pipeline.n_samples,
        "fixed_code": s.fixed_code,
        "precision": pipeline.model.computes_in,
        "config": files.config.name,
        "checkpoint": files.ckpt.name if files.ckpt else "random weights",
        **({"decoder": pipeline.model.settings.taesd.name} if pipeline.model.settings.taesd else {}),
        **({"lora": ", ".join(f"{p.name}:{w}" for p, w in pipeline.model.settings.loras)} if pipeline.model.settings.loras else {}),
        "software": f"ldm-sd2 {pipeline.task}",
        **pipeline.metadata(),
        **(pipeline.controller.metadata() if pipeline.controller is not None else {}),
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
        "schedule": pipeline.schedule,
        "steps": pipeline.sampling.steps,
        "unet_calls_per_batch": pipeline.unet_calls_per_batch,
        "H": pipeline.height,
        "W": pipeline.width,
        "n_samples": pipeline.n_samples,
        "n_iter": output.n_iter,
        "precision": pipeline.model.computes_in,
        "attention": settings.attention,
        "sdpa_disabled": [n for n in ("flash", "mem_efficient", "math") if getattr(settings, f"disable_{n}")],
        "compile": (settings.compile_mode or "default") if settings.compile else False,
        "compile_backend": settings.compile_backend if settings.compile else None,
        "cache_interval": settings.cache_interval,
        "cache_depth": settings.cache_depth if settings.cache_interval > 1 else None,
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


@dataclass
class Prepared:
    """A run's checked inputs: nothing is loaded yet."""

    model: Model
    pipeline: Pipeline
    output: OutputSettings
    batches: list[list[str]]
    units: list[Unit]
    writer: ImageWriter


def prepare(args, task: str, seed_mode: str, session: Session) -> Prepared:
    """Check every input of ``task``'s parsed flags ``args``; every rank runs the same checks."""
    from ldm.generation.tasks import TASKS

    model_settings, output = model_settings_from_args(args), output_settings_from_args(args)
    task_class = TASKS[task]
    if model_settings.config is None and Path(task_class.family_config) != SD2_CONFIG:
        # Another family: its own config by default, and no demo model to fall back on.
        config = Path(task_class.family_config)
        model_settings.config = config if config.exists() else REPO_ROOT / config
        if model_settings.ckpt is None and not model_settings.random_weights:
            raise GenerationError(f"--ckpt is required for {task}: pass its checkpoint (with --config {task_class.family_config})")
    model = Model(model_settings)
    sampling = sampling_from_args(args, task, model)
    if model.files.demo and session.is_main:
        print(
            f"Using the demo model ({_shown(model.files.config)}, prompts like {DEMO_PROMPT!r}); for Stable Diffusion 2 pass "
            f"--config {SD2_CONFIG} --ckpt PATH/TO/v2-1_512-ema-pruned.ckpt"
        )
    check_latent_flags(args, model.geometry)
    pipeline = task_class.from_args(model, sampling, output.n_samples, output.vae_slice_size, args)
    pipeline.use_controls(controls_from_args(args))
    default_prompt = DEMO_PROMPT if model.files.demo else pipeline.default_prompt
    batches = read_prompts(args.prompt, args.from_file, output.n_samples, default_prompt, args.repeat)
    model.check_prompts([*dict.fromkeys(p for batch in batches for p in batch), sampling.negative_prompt])
    check_output_paths(output)
    pipeline.vae_tile_size = args.vae_tile_size
    check_fits(pipeline, guided=pipeline.guided)
    if hasattr(pipeline, "t_enc") and session.is_main:
        logger.info("%s: the init image is noised by %d of %d steps, then denoised", task, pipeline.t_enc, sampling.steps)
    writer = ImageWriter(output.outdir, Watermarker(output.watermark), image_metadata(pipeline, seed_mode))
    return Prepared(model, pipeline, output, batches, job_units(batches, output.n_iter), writer)


def make_plan(prepared: Prepared, seed_mode: str, skip_existing: bool, session: Session) -> Plan:
    """Rank 0's decisions for every rank: the file numbering and the images already written."""
    units, sample_dir = prepared.units, prepared.writer.sample_dir
    total = sum(len(u.prompts) for u in units)
    if skip_existing:
        existing = distributed.check_existing(sample_dir, units, prepared.writer.metadata, prepared.pipeline.sampling.seed)
        if existing:
            logger.info("--skip_existing: %d of the job's %d images are in %s already", len(existing), total, _shown(sample_dir))
        return Plan(seed_mode, 0, existing, total)
    if session.distributed:  # every rank numbers from the same base: the next free number now
        return Plan(seed_mode, next_number(sample_dir, SAMPLE_NAME) if sample_dir.is_dir() else 0, total_images=total)
    return Plan(seed_mode, None, total_images=total)


def load_and_generate(prepared: Prepared, work: Work) -> Timing:
    """:func:`generate`, with its failures turned into one-line errors."""
    model, pipeline, output = prepared.model, prepared.pipeline, prepared.output
    try:
        return generate(pipeline, prepared.batches, output, prepared.writer, work)
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
        if model.settings.compile and type(e).__module__.startswith(("torch._dynamo", "torch._inductor")):
            raise GenerationError(f"torch.compile failed on the UNet: {message.strip().splitlines()[0]}") from None
        raise


def run(args, task: str) -> None:
    """Check every input, then load, generate and write; ``args`` are the parsed flags of ``task``.

    Under torchrun each process generates its share of the job (ldm.generation.distributed) and
    rank 0 writes the grid, the time and stats files and the summary.
    """
    job = distributed.settings_from_args(args)
    session = Session.from_env(job.timeout)
    seed_mode = job.resolved_seed_mode(session.world_size)
    args.device = session.device(args.device)
    session.start(args.device)
    try:
        _run(args, task, job.skip_existing, seed_mode, session)
    finally:
        session.close()


def _run(args, task: str, skip_existing: bool, seed_mode: str, session: Session) -> None:
    # 1. Every rank checks its inputs, rank 0 plans; they meet, and one failure stops them all.
    prepared, plan, digest, own = None, None, None, None
    try:
        prepared = prepare(args, task, seed_mode, session)
        digest = distributed.job_digest(prepared.units, prepared.writer.metadata)
        if session.is_main:
            plan = make_plan(prepared, seed_mode, skip_existing, session)
    except Exception as e:  # noqa: BLE001  (reported to the other ranks, then raised here)
        if isinstance(e, Terminated):
            raise
        own = e
    outcomes = session.all_gather(Outcome(session.rank, distributed.describe(own) if own else None, (plan, digest)), "starting the run")
    distributed.raise_failures(outcomes, session.rank, own)
    distributed.check_same_job([o.data[1] for o in outcomes])
    plan = outcomes[0].data[0]
    if session.is_main and seed_mode == "batch" and args.seed_mode is None:
        logger.info("seeding each batch from --seed and its index (--seed_mode batch): the images do not depend on the "
                    "number of processes; a one-process run gives them with --seed_mode batch")

    # 2. Each rank generates its share, stopping early when another fails; they meet again.
    work = Work(plan.share(prepared.units, session.rank, session.world_size), plan, session.check_peers, session.is_main)
    timing, own = Timing(), None
    try:
        timing = load_and_generate(prepared, work)
    except (Terminated, KeyboardInterrupt) as e:
        session.report_failure("terminated by SIGTERM" if isinstance(e, Terminated) else "interrupted")
        raise
    except Exception as e:  # noqa: BLE001
        own = e
        if isinstance(e, distributed.PeerFailed):
            n = len(prepared.writer.saved)
            own = distributed.PeerFailed(f"{e} (the {n} image{'s' * (n != 1)} this process wrote {'are' if n != 1 else 'is'} complete)")
        elif session.distributed:
            session.report_failure(distributed.describe(e))
    report = distributed.RankReport(session.rank, socket.gethostname(), device_name(prepared.model.device), timing.images,
                                    timing.batches, timing.seconds, timing.peak_gpu_memory_bytes,
                                    [p.name for p in prepared.writer.saved])
    outcomes = session.all_gather(Outcome(session.rank, distributed.describe(own) if own else None, report,
                                          stopped=isinstance(own, distributed.PeerFailed)), "finishing the run")
    distributed.raise_failures(outcomes, session.rank, own)
    shown = session.gather(timing.shown, "collecting the images of the grid")
    if session.is_main:
        finish(prepared, plan, [o.data for o in outcomes], [item for items in shown for item in items], session)
    elif timing.images:
        logger.info("%d images in %.3f s; rank 0 writes the grid and the summary", timing.images, timing.seconds)


def finish(prepared: Prepared, plan: Plan, reports: list[distributed.RankReport], shown: list[tuple[int, str, np.ndarray]],
           session: Session) -> None:
    """Rank 0, once every rank is done: the grid, the time and stats files, the summary line."""
    pipeline, output, writer = prepared.pipeline, prepared.output, prepared.writer
    timing = Timing(max(r.seconds for r in reports), sum(r.images for r in reports), sum(r.batches for r in reports),
                    max((r.peak_gpu_memory_bytes for r in reports if r.peak_gpu_memory_bytes is not None), default=None))
    if not timing.images:
        print(f"all {plan.total_images} images of the job are in {writer.sample_dir} already: nothing to do")
        return
    shown.sort(key=lambda item: item[0])
    try:
        timing.grid = writer.grid([a for _, _, a in shown], output.n_rows or pipeline.n_samples, [p for _, p, _ in shown])
    except OSError as e:
        raise GenerationError(f"writing the output failed: {e}") from None
    if output.time_file:
        write_text(output.time_file, f"{timing.seconds:.6f}\n", overwrite=True)
    if output.stats_file:
        stats = run_stats(pipeline, output, timing)
        if session.distributed or plan.seed_mode != "stream":
            stats.update(distributed.job_stats(reports, plan, pipeline.steps_per_batch))
        write_text(output.stats_file, json.dumps(stats, indent=2) + "\n", overwrite=True)
    numbers = sorted(int(SAMPLE_NAME.match(name).group(1)) for r in reports for name in r.saved)
    first, last = f"{numbers[0]:05}.png", f"{numbers[-1]:05}.png"
    names = first if first == last else f"{first} to {last}"
    plural = "s" if len(numbers) != 1 else ""
    skipped = f", {len(plan.existing)} already there" if plan.existing else ""
    parallel = ""
    if session.distributed:
        parallel = f" by {session.world_size} processes, {timing.images / timing.seconds:.2f} images/s in all"
    print(
        f"{len(numbers)} image{plural} in {writer.sample_dir} ({names}{skipped}), grid {timing.grid}; "
        f"{timing.seconds / timing.images:.3f} s/image, {timing.batches * pipeline.steps_per_batch / timing.seconds:.2f} it/s{parallel}"
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
    handler.setFormatter(logging.Formatter(f"{distributed.log_prefix()}%(levelname)s: %(message)s"))
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


def report_error(prog: str, error: UsageError | GenerationError) -> int:
    """Print ``error`` as one ``error:`` line; its exit status: 2 for a flag's value, 1 otherwise."""
    print(f"{prog}: error: {error}", file=sys.stderr)
    return 2 if isinstance(error, UsageError) else 1


def main(argv: Sequence[str] | None = None, task: str = "txt2img") -> int:
    """The command line of ``task`` (a name in ``ldm.generation.tasks.TASKS``); returns the exit status."""
    parser = build_parser(task)
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, or argparse's own usage error (already printed)
        return int(e.code or 0)
    parser.prog = f"{distributed.log_prefix()}{parser.prog}"  # under torchrun: which process says it
    with cli_logging(), sigterm_as_exception():
        try:
            run(args, task)
        except (UsageError, GenerationError) as e:
            return report_error(parser.prog, e)
        except KeyboardInterrupt:
            print(f"{parser.prog}: interrupted (images written so far are complete)", file=sys.stderr)
            return 130
        except Terminated:
            why = "; torchrun stops every process when one fails: see the first error" if distributed.log_prefix() else ""
            print(f"{parser.prog}: terminated by SIGTERM (images written so far are complete{why})", file=sys.stderr)
            return 128 + signal.SIGTERM
    return 0
