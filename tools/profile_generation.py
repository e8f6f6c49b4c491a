#!/usr/bin/env python
"""Say where a txt2img generation's time goes: text encoder, UNet (and its attention), VAE decode,
and host overhead, from a torch.profiler trace of one generation after a warm-up.

The model, sampler, attention kernel, SDPA backends and compilation are set up by the same code
as scripts/txt2img.py (ldm.generation), and the generation is its batch: the prompt and the empty
prompt encoded, the latents sampled under classifier-free guidance, then decoded.

    python tools/profile_generation.py --config configs/stable-diffusion/v2-inference.yaml \\
        --random_weights --device cuda --sampler plms --steps 50 --compile --trace trace.json

How each figure is obtained (see docs/benchmark.md, "Where the time goes"):

* The three components are ``record_function`` ranges around the model's
  ``get_learned_conditioning``, ``apply_model`` (every sampler step's UNet call) and
  ``decode_first_stage``. On the CPU a component's seconds are the wall time spent inside its
  ranges; on CUDA they are the device time of the kernels launched inside them.
* Attention: within the UNet ranges, the outermost ops whose names contain ``scaled_dot_product``,
  ``attention``, ``softmax`` or ``bmm`` (in this UNet only attention computes a softmax or a
  batched matmul; the projections are linear layers), with their children, so helper ops inside
  them count once and nothing twice. CPU time on the CPU, device time on CUDA.
* Host overhead: on the CPU the wall time outside the three ranges (sampler updates, Python,
  profiler bookkeeping); on CUDA the wall time the device was idle (wall minus the union of all
  kernel and copy intervals), with kernels outside the ranges shown as "other device work".
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function

from ldm.devices import device_name, synchronize
from ldm.fileio import atomic_path, write_text
from ldm.generation.errors import GenerationError, UsageError
from ldm.generation.run import (
    Job, cli_logging, make_batch_fn, precision_context, prepare, seed_everything, setup_model,
)
from ldm.modules.attention import IMPLEMENTATIONS, sdpa_backends

PROG = "profile_generation.py"
RANGES = {"get_learned_conditioning": "text encoder", "apply_model": "UNet", "decode_first_stage": "VAE decode"}
ATTENTION_PATTERNS = ("scaled_dot_product", "attention", "softmax", "bmm")
HOST = "host overhead"
OTHER_DEVICE = "other device work"


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=str, default=None, help="model config (default: txt2img.py's)")
    weights = p.add_mutually_exclusive_group()
    weights.add_argument("--ckpt", type=str, default=None, help="model checkpoint (.ckpt or .safetensors)")
    weights.add_argument("--random_weights", action="store_true", help="random weights: the full architecture, no download")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=["full", "autocast"], default="autocast")
    p.add_argument("--H", type=_positive, default=None, help="image height (default: the model's)")
    p.add_argument("--W", type=_positive, default=None, help="image width (default: the model's)")
    p.add_argument("--steps", type=_positive, default=50)
    p.add_argument("--sampler", choices=["ddim", "plms", "dpm"], default="plms")
    p.add_argument("--n_samples", type=_positive, default=1, help="batch size (default: %(default)s)")
    p.add_argument("--scale", type=float, default=9.0, help="guidance scale; 1.0 skips the empty prompt (default: %(default)s)")
    p.add_argument("--prompt", type=str, default="A photo")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--attention", choices=IMPLEMENTATIONS, default="sdpa")
    p.add_argument("--compile", action="store_true", help="compile the UNet with torch.compile (during the warm-up)")
    p.add_argument("--compile_mode", type=str, default=None)
    p.add_argument("--disable_flash", action="store_true")
    p.add_argument("--disable_mem_efficient", action="store_true")
    p.add_argument("--disable_math", action="store_true")
    p.add_argument("--trace", type=Path, default=None, help="also write the Chrome trace (chrome://tracing, Perfetto) here")
    p.add_argument("--json", type=Path, default=None, help="also write the table as JSON here")
    p.add_argument("--force", action="store_true", help="overwrite existing --trace/--json files")
    return p


def txt2img_args(args: argparse.Namespace) -> argparse.Namespace:
    """The same settings as txt2img.py's flags, so that its checks and setup apply unchanged."""
    from ldm.generation.options import build_parser as txt2img_parser

    argv = [
        "--prompt", args.prompt, "--steps", str(args.steps), "--n_samples", str(args.n_samples), "--n_iter", "1",
        "--scale", str(args.scale), "--seed", str(args.seed), "--precision", args.precision, "--device", args.device,
        "--attention", args.attention, "--no_watermark", "--outdir", tempfile.gettempdir(),  # nothing is written there
    ]
    for flag in ("config", "ckpt", "H", "W", "compile_mode"):
        if getattr(args, flag) is not None:
            argv += [f"--{flag}", str(getattr(args, flag))]
    for flag in ("random_weights", "compile", "disable_flash", "disable_mem_efficient", "disable_math"):
        if getattr(args, flag):
            argv.append(f"--{flag}")
    if args.sampler != "ddim":
        argv.append(f"--{args.sampler}")
    return txt2img_parser("txt2img").parse_args(argv)


def _ranged(method: Callable, label: str) -> Callable:
    @functools.wraps(method)
    def call(*a: Any, **kw: Any) -> Any:
        with record_function(label):
            return method(*a, **kw)

    return call


@contextlib.contextmanager
def labelled(model: torch.nn.Module) -> Iterator[None]:
    """Wrap the model's text-encoder, UNet and decoder entry points in profiler ranges (instance
    attributes shadowing the methods, removed afterwards)."""
    for attr, label in RANGES.items():
        setattr(model, attr, _ranged(getattr(model, attr), label))
    try:
        yield
    finally:
        for attr in RANGES:
            delattr(model, attr)


def profile_generation(job: Job) -> tuple[Any, float]:
    """One warm-up generation, then one under the profiler; the profiler and its wall seconds."""
    args, model, device = job.args, job.model, job.device
    prompts = job.batches[0]
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.no_grad(), sdpa_backends(args.disable_flash, args.disable_mem_efficient, args.disable_math), \
            model.ema_scope(), precision_context(args, device), labelled(model):
        seed_everything(args.seed)
        make_batch_fn(job)(prompts)
        seed_everything(args.seed)
        batch = make_batch_fn(job)
        synchronize(device)
        with profile(activities=activities) as prof:
            start = time.perf_counter()
            batch(prompts)
            synchronize(device)
            wall = time.perf_counter() - start
    return prof, wall


def _attention_events(event: Any) -> Iterator[Any]:
    """The outermost ops under ``event`` whose names mark attention."""
    for child in event.cpu_children:
        if any(p in child.name.lower() for p in ATTENTION_PATTERNS):
            yield child
        else:
            yield from _attention_events(child)


def _union_us(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def summarize(events: Sequence[Any], wall: float, on_device: bool) -> dict[str, Any]:
    """Seconds and shares of the wall time per component, from the profiler's events."""
    cpu = [e for e in events if e.device_type == DeviceType.CPU]
    rows: list[dict[str, Any]] = []
    attention = unet = 0.0
    for label in RANGES.values():
        ranges = [e for e in cpu if e.name == label]
        host = sum(e.cpu_time_total for e in ranges) / 1e6
        seconds = sum(e.device_time_total for e in ranges) / 1e6 if on_device else host
        rows.append({"component": label, "seconds": seconds, "host_seconds": host, "calls": len(ranges)})
        if label == "UNet":
            found = [a for e in ranges for a in _attention_events(e)]
            attention = sum(a.device_time_total if on_device else a.cpu_time_total for a in found) / 1e6
            unet = seconds
    named = sum(r["seconds"] for r in rows)
    if on_device:
        kernels = [e for e in events if e.device_type != DeviceType.CPU and e.name not in RANGES.values()]
        if kernels:
            busy_us = _union_us([(e.time_range.start, e.time_range.end) for e in kernels])
        else:  # no device events of their own in this PyTorch: the kernels attached to the ops
            busy_us = sum(e.self_device_time_total for e in cpu)
        busy = min(busy_us / 1e6, wall)
        rows.append({"component": OTHER_DEVICE, "seconds": max(busy - named, 0.0), "host_seconds": None, "calls": None})
        rows.append({"component": HOST, "seconds": wall - busy, "host_seconds": None, "calls": None})
    else:
        busy = None
        rows.append({"component": HOST, "seconds": max(wall - named, 0.0), "host_seconds": None, "calls": None})
    total = sum(r["seconds"] for r in rows)
    for r in rows:
        r["share"] = r["seconds"] / total if total else 0.0
    return {
        "wall_seconds": wall,
        "device_busy_seconds": busy,
        "components": rows,
        "unet_attention_seconds": attention,
        "unet_attention_share_of_unet": attention / unet if unet else 0.0,
        "attention_patterns": list(ATTENTION_PATTERNS),
    }


def markdown(summary: dict[str, Any]) -> str:
    seconds_kind = "device s" if summary["device_busy_seconds"] is not None else "wall s"
    lines = [f"| component | {seconds_kind} | share | host s | calls |", "|---|---:|---:|---:|---:|"]
    for r in summary["components"]:
        host = "" if r["host_seconds"] is None else f"{r['host_seconds']:.4f}"
        calls = "" if r["calls"] is None else str(r["calls"])
        lines.append(f"| {r['component']} | {r['seconds']:.4f} | {100 * r['share']:.1f}% | {host} | {calls} |")
        if r["component"] == "UNet":
            lines.append(
                f"| - of which attention | {summary['unet_attention_seconds']:.4f} | "
                f"{100 * summary['unet_attention_share_of_unet']:.1f}% of UNet | | |"
            )
    lines.append(f"| total | {summary['wall_seconds']:.4f} | 100.0% | | |")
    return "\n".join(lines)


def settings(job: Job, args: argparse.Namespace) -> dict[str, Any]:
    return {
        "device": device_name(job.device), "torch": torch.__version__, "config": str(job.files.config),
        "checkpoint": str(job.files.ckpt) if job.files.ckpt else "random weights", "sampler": job.sampler_name,
        "steps": args.steps, "H": job.height, "W": job.width, "n_samples": args.n_samples, "scale": args.scale,
        "precision": args.precision, "attention": args.attention, "compile": args.compile,
        "sdpa_disabled": [n for n in ("flash", "mem_efficient", "math") if getattr(args, f"disable_{n}")],
    }


def check_outputs(args: argparse.Namespace) -> None:
    """Refuse, before the long run, outputs that exist (without --force) or cannot be written."""
    for flag, path in (("--trace", args.trace), ("--json", args.json)):
        if path is None:
            continue
        if path.is_dir():
            raise GenerationError(f"{flag} {path}: is a folder")
        if path.exists() and not args.force:
            raise GenerationError(f"{flag} {path}: exists; pass --force to overwrite it")
        if not path.parent.is_dir():
            raise GenerationError(f"{flag} {path}: folder {path.parent} does not exist")


def run(args: argparse.Namespace) -> None:
    check_outputs(args)
    job = prepare(txt2img_args(args), "txt2img")
    setup_model(job)
    try:
        prof, wall = profile_generation(job)
    except RuntimeError as e:
        message = str(e)
        if "No available kernel" in message or "No viable backend" in message:
            raise GenerationError(f"the SDPA backends left enabled cannot run this model's attention: {message.splitlines()[0]}") from None
        raise
    summary = summarize(prof.events(), wall, job.device.type == "cuda")
    summary["settings"] = settings(job, args)
    s = summary["settings"]
    print(
        f"One generation on {s['device']}: {s['sampler']} {s['steps']} steps, {s['W']}x{s['H']}, batch {s['n_samples']}, "
        f"{s['precision']}, attention {s['attention']}{', compiled' if s['compile'] else ''}; "
        f"{wall:.3f} s under the profiler (warm-up excluded)\n"
    )
    print(markdown(summary))
    if args.trace:
        with atomic_path(args.trace, overwrite=args.force) as tmp:
            prof.export_chrome_trace(str(tmp))
        print(f"\ntrace: {args.trace}")
    if args.json:
        write_text(args.json, json.dumps(summary, indent=2) + "\n", overwrite=args.force)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    with cli_logging():
        try:
            run(args)
        except UsageError as e:
            print(f"{PROG}: error: {e}", file=sys.stderr)
            return 2
        except (GenerationError, OSError) as e:
            print(f"{PROG}: error: {e}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
