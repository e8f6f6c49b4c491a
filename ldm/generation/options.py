"""The command line: the flags every task shares plus the task's own, parsed into typed settings;
prompt reading and output-path checks."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

import torch

from ldm.generation import control, distributed
from ldm.generation.argtypes import finite, float_in, non_negative, positive, seed
from ldm.generation.errors import GenerationError, UsageError
from ldm.generation.model import SD2_CONFIG, Model
from ldm.generation.pipeline import VAE_SLICE_PIXELS
from ldm.generation.settings import ModelSettings, OutputSettings, SamplingSettings
from ldm.generation.speed import BACKENDS
from ldm.models.diffusion.samplers import ORIGINAL_FLAGS, SAMPLERS, parse_sampler
from ldm.models.diffusion.schedules import SCHEDULES
from ldm.modules.attention import IMPLEMENTATIONS
from ldm.modules.encoders.prompts import PROMPT_SYNTAXES

logger = logging.getLogger(__name__)

DEMO_PROMPT = "a red circle"
# The flags whose default a task (its cli_defaults) or a model (its config's ``sampling:``) may set;
# they parse to None when not given, and :func:`fill_sampling_defaults` fills them.
SAMPLING_DEFAULTS = {"sampler": "ddim", "schedule": None, "steps": 50, "scale": 9.0, "strength": None}


def lora_spec(text: str) -> tuple[str, float]:
    """``FILE[:WEIGHT]`` (a Windows drive's colon kept), checked as argparse parses it."""
    path, colon, weight = text.rpartition(":")
    if colon:
        try:
            return path, float(weight)
        except ValueError:
            pass
    return text, 1.0


def sampler_choice(text: str) -> str:
    """A sampler's name or AUTOMATIC1111 spelling, checked as argparse parses it."""
    try:
        parse_sampler(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def build_parser(task: str) -> argparse.ArgumentParser:
    """The flags of ``task``: the original script's, the task's own, then the shared new ones."""
    from ldm.generation.tasks import TASKS

    pipeline = TASKS[task]
    defaults = task_sampling_defaults(task)
    model_default = "or the model config's sampling: section"
    p = argparse.ArgumentParser(prog=pipeline.script or f"{task}.py", description=f"{pipeline.__doc__ or task} See docs/pipelines.md.")
    p.add_argument("--prompt", type=str, nargs="?", default=None,
                   help=f"the prompt to render (default: {pipeline.default_prompt!r}; {DEMO_PROMPT!r} for the demo model); "
                        "AUTOMATIC1111's syntax: (word) x1.1, [word] /1.1, (word:1.3), \\( for a literal bracket, BREAK to "
                        "start a new 75-token chunk; any length (see docs/adapters.md)")
    p.add_argument("--negative_prompt", type=str, default="",
                   help="what guidance steers away from: the unconditional text of classifier-free guidance, in the "
                        "prompt's syntax (default: empty, the original's; no effect at --scale 1)")
    pipeline.add_arguments(p)
    p.add_argument("--outdir", type=str, nargs="?", default=f"outputs/{task}-samples", help="folder to write results to (default: %(default)s)")
    p.add_argument(*pipeline.step_flags, dest="steps", type=positive, default=None,
                   help=f"number of sampling steps (default: {defaults['steps']}, {model_default})")
    samplers = p.add_mutually_exclusive_group()
    offered = pipeline.samplers()
    samplers.add_argument("--sampler", type=sampler_choice, default=None, metavar="NAME",
                          help=f"the sampler: {', '.join(offered)}; or as AUTOMATIC1111 spells it, with a schedule: "
                               f"'DPM++ 2M Karras', 'Euler a' (default: {defaults['sampler']}, {model_default}; see docs/samplers.md)")
    for name, flag in ORIGINAL_FLAGS.items():
        if name in offered:
            samplers.add_argument(flag, dest="sampler", action="store_const", const=name, help=f"use {SAMPLERS[name].title} sampling")
    p.add_argument("--schedule", choices=list(SCHEDULES) + ["sgm_uniform"], default=None,
                   help="the noise schedule of a k-diffusion sampler (default: the model config's where the sampler runs on it, "
                        "SD-Turbo's trailing; else the sampler's own: karras for DPM++ 2M, SDE, 2S a and DPM2, exponential for "
                        "DPM++ 2M/3M SDE, normal for the rest; DDIM and PLMS run on uniform only)")
    p.add_argument("--fixed_code", action="store_true", help="use the same starting noise for every batch")
    eta_default = f"{pipeline.default_eta} for the samplers that take one" if pipeline.default_eta is not None else "the sampler's"
    p.add_argument("--ddim_eta", "--eta", dest="ddim_eta", type=float_in(0.0), default=None,
                   help=f"eta of DDIM, ancestral and SDE samplers: the noise added back per step, 0 for deterministic "
                        f"(default: {eta_default}: 0 for DDIM, 1 for ancestral and SDE samplers)")
    p.add_argument("--n_iter", type=positive, default=1, help="sample this often (default: %(default)s)")
    p.add_argument("--C", type=positive, default=None, help="latent channels (default: the model's, 4 for SD2)")
    p.add_argument("--f", type=positive, default=None, help="autoencoder downsampling factor (default: the model's, 8 for SD2)")
    p.add_argument("--n_samples", type=positive, default=1, help="images per prompt batch, the batch size (default: %(default)s)")
    p.add_argument("--n_rows", type=non_negative, default=0, help="images per row of the grid (default: 0, n_samples)")
    p.add_argument("--scale", type=finite, default=None,
                   help="classifier-free guidance scale: eps = eps(x, empty) + scale * (eps(x, cond) - eps(x, empty)); "
                        f"1 is no guidance, one UNet batch per step (default: {defaults['scale']}, {model_default})")
    p.add_argument("--from-file", type=str, default=None, help="read prompts from this file, one per line")
    p.add_argument("--repeat", type=positive, default=1, help="with --from-file: repeat each prompt this often (default: %(default)s)")
    p.add_argument("--seed", type=seed, default=42, help="the seed for reproducible sampling (default: %(default)s)")
    if pipeline.controllable:
        control.add_arguments(p)
    bench = add_model_arguments(p, pipeline.family_config)
    bench.add_argument("--skip_first", action="store_true",
                       help="run one warm-up batch of each batch size first, neither timed nor saved")
    bench.add_argument("--time_file", type=str, default=None,
                       help="write the seconds of the timed iterations (sampling + decoding) to this file")
    bench.add_argument("--stats_file", type=str, default=None, help="write timing, memory and settings as JSON to this file")
    bench.add_argument("--no_watermark", action="store_true", help="do not add the invisible watermark")
    bench.add_argument("--vae_slice_size", type=positive, default=None,
                       help=f"decode at most this many latents at a time (default: as many as make {VAE_SLICE_PIXELS // 2**20} Mpixel, at least 1)")
    bench.add_argument("--vae_tile_size", type=positive, default=None,
                       help="decode in overlapping tiles of this many latent pixels (default: whole images; tiles are "
                            "chosen automatically when a whole image would not fit in memory)")
    distributed.add_arguments(p)
    p.set_defaults(**{k: v for k, v in pipeline.cli_defaults.items() if k not in SAMPLING_DEFAULTS})
    return p


def task_sampling_defaults(task: str) -> dict:
    """The sampling defaults of ``task``'s script: the original's, then the task's own."""
    from ldm.generation.tasks import TASKS

    cli = TASKS[task].cli_defaults
    return {**SAMPLING_DEFAULTS, **{k: v for k, v in cli.items() if k in SAMPLING_DEFAULTS}}


def sampling_defaults(task: str, model: Model) -> dict:
    """The sampling defaults of ``task`` on ``model``: the task's, then the model config's."""
    return {**task_sampling_defaults(task), **model.sampling_defaults(task)}


def fill_sampling_defaults(args: argparse.Namespace, task: str, model: Model) -> None:
    """Give the sampling flags left out their defaults (:func:`sampling_defaults`); ``--ddim_eta`` stays
    None when not given: the pipeline resolves it (a deterministic sampler takes none)."""
    defaults = sampling_defaults(task, model)
    for dest, value in defaults.items():
        if dest != "schedule" and hasattr(args, dest) and getattr(args, dest) is None:
            setattr(args, dest, value)
    if args.schedule is None:
        args.schedule = default_schedule(args.sampler, defaults["schedule"])


def default_schedule(sampler: str, schedule: str | None) -> str | None:
    """A default schedule (a model config's) for ``sampler``, unless its spelling names one
    ("DPM++ 2M Karras") or it cannot run on it (PLMS on SD-Turbo's trailing): then its own."""
    name, named = parse_sampler(sampler)
    return schedule if named is None and schedule in SAMPLERS[name].schedules else None


def add_model_arguments(p: argparse.ArgumentParser, default_config: str = str(SD2_CONFIG)) -> argparse._ArgumentGroup:
    """The flags that choose the model and how it computes, shared by the scripts and the web UI;
    returns the "speed and benchmarking" group, for a program's own speed flags."""
    p.add_argument("--config", type=str, default=None,
                   help=f"model config (default: {default_config}" + (", or the demo model when neither --config nor --ckpt is given)" if default_config == str(SD2_CONFIG) else ")"))
    p.add_argument("--ckpt", type=str, default=None,
                   help="model checkpoint (.ckpt or .safetensors), or a diffusers folder (converted as it loads; without "
                        "--config, the folder's own config: see docs/adapters.md)")
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
    bench.add_argument("--compile", action="store_true",
                       help="compile the UNet with torch.compile; on the CPU the UNet and VAE decoder, ahead of time, "
                            "kept in TORCHINDUCTOR_CACHE_DIR (default ~/.cache/ldm-sd2/torchinductor) for later runs")
    bench.add_argument("--compile_mode", type=str, default=None,
                       help="torch.compile mode: default, reduce-overhead, max-autotune, ... (default: default)")
    bench.add_argument("--compile_backend", choices=list(BACKENDS), default="inductor",
                       help="what --compile compiles with: inductor (PyTorch's), or OpenVINO's torch.compile backend on the CPU "
                            "(pip install openvino; it is fed float32 and chooses its own precision) (default: %(default)s)")
    bench.add_argument("--cache_interval", type=positive, default=1, metavar="N",
                       help="step caching (DeepCache): only every N-th UNet call runs the whole UNet, the others its shallow "
                            "blocks on the kept deep features; faster, at a cost to the image (docs/benchmark.md). 1: off (default)")
    bench.add_argument("--cache_depth", type=int, default=1, metavar="D",
                       help="with --cache_interval: the shallow path's depth, input blocks 0..D and the last D+1 output blocks "
                            "(larger: closer to the full UNet, slower) (default: %(default)s, DeepCache's default branch)")
    p.add_argument("--lora", action="append", type=lora_spec, default=[], metavar="FILE[:WEIGHT]",
                   help="merge this LoRA (kohya or diffusers/peft format) into the weights, at WEIGHT (default 1); "
                        "repeat for several (see docs/adapters.md)")
    p.add_argument("--lora_dir", type=str, default=None, metavar="DIR",
                   help="the folder of the LoRA files that prompts name with <lora:NAME:WEIGHT> (NAME: the file's stem)")
    p.add_argument("--taesd", type=str, default=None, metavar="PATH",
                   help="decode with TAESD's tiny decoder (taesd_decoder.safetensors) instead of the VAE: about 20x faster, "
                        "an approximation of the VAE's images (see docs/samplers.md, SD-Turbo on a CPU)")
    bench.add_argument("--random_weights", action="store_true",
                       help="random weights (the same every run) instead of --ckpt (timing only: the images are noise)")
    prompts = p.add_argument_group("prompts and textual inversion (see docs/adapters.md)")
    prompts.add_argument("--prompt_syntax", choices=list(PROMPT_SYNTAXES), default="a1111",
                         help="how prompts are read: a1111, AUTOMATIC1111's weights and BREAK; none, brackets are plain "
                              "text. Either way prompts over 75 tokens are encoded in 75-token chunks, not truncated (default: %(default)s)")
    prompts.add_argument("--embedding", dest="embeddings", action="append", default=[], metavar="FILE",
                         help="a textual-inversion embedding for SD2 (A1111 .pt/.bin, safetensors with emb_params, diffusers learned_embeds, a bare "
                              "tensor), used wherever its file's stem appears in a prompt; repeatable")
    prompts.add_argument("--embeddings_dir", type=str, default=None, metavar="DIR",
                         help="use every embedding file under this folder, each named by its file's stem (those for other "
                              "models, SD1 or SDXL, are skipped with a warning)")
    return bench


def model_settings_from_args(args: argparse.Namespace) -> ModelSettings:
    """The model settings of the flags :func:`add_model_arguments` adds."""
    return ModelSettings(
        config=args.config, ckpt=args.ckpt, random_weights=args.random_weights, device=args.device,
        precision="bf16" if args.bf16 else args.precision, attention=args.attention, disable_flash=args.disable_flash,
        disable_mem_efficient=args.disable_mem_efficient, disable_math=args.disable_math, compile=args.compile,
        compile_mode=args.compile_mode, compile_backend=args.compile_backend, cache_interval=args.cache_interval, cache_depth=args.cache_depth, taesd=args.taesd, loras=tuple(args.lora), lora_dir=args.lora_dir,
        prompt_syntax=args.prompt_syntax, embeddings=tuple(args.embeddings), embeddings_dir=args.embeddings_dir,
    )


def sampling_from_args(args: argparse.Namespace, task: str, model: Model) -> SamplingSettings:
    """The sampling settings the flags describe, the flags left out at the task's and model's defaults
    (which are written into ``args``, where the task's own flags, ``--strength``, read them)."""
    fill_sampling_defaults(args, task, model)
    if args.scale == 0.0:
        logger.warning("--scale 0 samples the unconditional prediction alone: the prompt has no effect "
                       "(for no guidance use --scale 1, what diffusers calls guidance_scale 0 or 1)")
    if args.scale == 1.0 and args.negative_prompt:
        logger.warning("--negative_prompt has no effect at --scale 1: without guidance there is no unconditional text")
    return SamplingSettings(args.sampler, args.steps, args.ddim_eta, args.scale, args.seed, args.fixed_code, args.schedule,
                            args.negative_prompt)


def output_settings_from_args(args: argparse.Namespace) -> OutputSettings:
    """Where and how the flags say results are written."""
    if args.repeat != 1 and not args.from_file:
        logger.warning("--repeat only applies to --from-file prompts")
    return OutputSettings(
        outdir=args.outdir, n_samples=args.n_samples, n_iter=args.n_iter, n_rows=args.n_rows, skip_first=args.skip_first,
        time_file=args.time_file, stats_file=args.stats_file, watermark=not args.no_watermark, vae_slice_size=args.vae_slice_size,
    )


def check_latent_flags(args: argparse.Namespace, geometry) -> None:
    """--f and --C, when given, must be the model's."""
    if args.f is not None and args.f != geometry.vae_factor:
        raise UsageError(f"--f {args.f}: this model's autoencoder downsamples by {geometry.vae_factor}")
    if args.C is not None and args.C != geometry.channels:
        raise UsageError(f"--C {args.C}: this model's latents have {geometry.channels} channels")


def read_prompts(prompt: str | None, from_file: str | None, n_samples: int, default: str, repeat: int = 1) -> list[list[str]]:
    """Prompt batches: n_samples copies of ``prompt``, or the lines of ``from_file`` in chunks of n_samples."""
    if not from_file:
        return [n_samples * [prompt if prompt is not None else default]]
    path = Path(from_file)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise GenerationError(f"--from-file {path}: no such file") from None
    except UnicodeDecodeError as e:
        raise GenerationError(f"--from-file {path}: not UTF-8 text ({e})") from None
    except OSError as e:
        raise GenerationError(f"--from-file {path}: cannot be read: {e.strerror or e}") from None
    prompts = [line for line in lines if line.strip() for _ in range(repeat)]
    if not prompts:
        raise GenerationError(f"--from-file {path}: holds no prompts (one per line; blank lines are skipped)")
    logger.info("read %d prompts from %s", len(prompts) // repeat, path)
    return [prompts[i : i + n_samples] for i in range(0, len(prompts), n_samples)]


def _check_writable_folder(path: Path, flag: str) -> None:
    """``path`` is, or can be created as, a writable folder."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise GenerationError(f"{flag} {path}: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise GenerationError(f"{flag} {path}: {existing} is not writable")


def check_output_paths(output: OutputSettings) -> None:
    """Fail now, not after a long run, when an output cannot be written."""
    _check_writable_folder(output.outdir, "--outdir")
    for flag, path in (("--time_file", output.time_file), ("--stats_file", output.stats_file)):
        if path:
            if path.is_dir():
                raise GenerationError(f"{flag} {path}: is a folder")
            parent = path.parent
            if not parent.is_dir():
                raise GenerationError(f"{flag} {path}: folder {parent} does not exist")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise GenerationError(f"{flag} {path}: folder {parent} is not writable")
