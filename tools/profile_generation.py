#!/usr/bin/env python
"""Say where a txt2img generation's time goes: text encoder, UNet (and its attention), VAE decode,
and host overhead, from a torch.profiler trace of one generation after a warm-up.

The model, sampler, attention kernel, SDPA backends and compilation are set up by the same code
as scripts/txt2img.py (ldm.generation), and the generation is its batch: the prompt encoded (the
empty prompt's encoding is kept from the warm-up, as in a run's later batches), the latents sampled
under classifier-free guidance, then decoded.

    python tools/profile_generation.py --config configs/stable-diffusion/v2-inference.yaml \\
        --random_weights --device cuda --plms --steps 50 --compile --trace trace.json

How each figure is obtained (see docs/benchmark.md, "Where the time goes"):

* The three components are ``record_function`` ranges around the prompt encoder's ``encode``
  (``Model.prompts``, through which the pipelines reach the text encoder), the model's
  ``apply_model`` (every sampler step's UNet call) and ``decode_first_stage``. On the CPU a component's seconds are the wall time spent inside its
  ranges; on CUDA they are the device time of the kernels launched inside them.
* Attention: within the UNet ranges, the outermost ops whose names contain ``scaled_dot_product``,
  ``attention``, ``softmax`` or ``bmm`` (in this UNet only attention computes a softmax or a
  batched matmul; the projections are linear layers), with their children, so helper ops inside
  them count once and nothing twice. CPU time on the CPU, device time on CUDA. A UNet compiled
  ahead of time (``--compile`` on the CPU) runs as one call the profiler cannot look into: its
  attention is then reported as unknown (``n/a``, ``null`` in ``--json``), not as zero.
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
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function

from ldm.devices import device_name, synchronize
from ldm.fileio import atomic_path, write_text
from ldm.generation.errors import GenerationError, UsageError
from ldm.generation.model import Model
from ldm.generation.options import build_parser as task_parser
from ldm.generation.options import model_settings_from_args, output_settings_from_args, read_prompts, sampling_from_args
from ldm.generation.pipeline import Pipeline
from ldm.generation.run import cli_logging, seed_everything
from ldm.generation.tasks import TASKS

PROG = "profile_generation.py"
LABELS = ("text encoder", "UNet", "VAE decode")
ATTENTION_PATTERNS = ("scaled_dot_product", "attention", "softmax", "bmm")
HOST = "host overhead"
OTHER_DEVICE = "other device work"


def build_parser(task: str) -> argparse.ArgumentParser:
    """The task script's own flags (so its checks apply unchanged) and the profiler's outputs."""
    p = task_parser(task)
    p.prog = PROG
    p.description = __doc__.split("\n\n")[0]
    p.set_defaults(n_samples=1, n_iter=1, seed=1, prompt="A photo")
    p.add_argument("--task", choices=sorted(TASKS), default="txt2img", help="the task to profile (default: %(default)s)")
    p.add_argument("--trace", type=Path, default=None, help="also write the Chrome trace (chrome://tracing, Perfetto) here")
    p.add_argument("--json", type=Path, default=None, help="also write the table as JSON here")
    p.add_argument("--force", action="store_true", help="overwrite existing --trace/--json files")
    return p


def _ranged(method: Callable, label: str) -> Callable:
    @functools.wraps(method)
    def call(*a: Any, **kw: Any) -> Any:
        with record_function(label):
            return method(*a, **kw)

    return call


@contextlib.contextmanager
def labelled(model: Model) -> Iterator[None]:
    """Wrap the text-encoder, UNet and decoder entry points in profiler ranges (instance attributes
    shadowing the methods, removed afterwards)."""
    net = model.load()
    entry_points = [(model.prompts, "encode"), (net, "apply_model"), (net, "decode_first_stage")]
    for (owner, attr), label in zip(entry_points, LABELS):
        setattr(owner, attr, _ranged(getattr(owner, attr), label))
    try:
        yield
    finally:
        for owner, attr in entry_points:
            delattr(owner, attr)


def profile_generation(pipeline: Pipeline, prompts: list[str]) -> tuple[Any, float]:
    """One warm-up generation, then one under the profiler; the profiler and its wall seconds."""
    model, seed = pipeline.model, pipeline.sampling.seed
    net, device = model.load(), model.device
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.no_grad(), model.backends(), net.ema_scope(), model.precision(), labelled(model):
        seed_everything(seed)
        pipeline.start()
        pipeline(prompts)
        seed_everything(seed)
        pipeline.start()
        synchronize(device)
        with profile(activities=activities) as prof:
            start = time.perf_counter()
            pipeline(prompts)
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
    attention: float | None = None
    unet = 0.0
    for label in LABELS:
        ranges = [e for e in cpu if e.name == label]
        host = sum(e.cpu_time_total for e in ranges) / 1e6
        seconds = sum(e.device_time_total for e in ranges) / 1e6 if on_device else host
        rows.append({"component": label, "seconds": seconds, "host_seconds": host, "calls": len(ranges)})
        if label == "UNet":
            found = [a for e in ranges for a in _attention_events(e)]
            attention = sum(a.device_time_total if on_device else a.cpu_time_total for a in found) / 1e6 if found else None
            unet = seconds
    named = sum(r["seconds"] for r in rows)
    if on_device:
        kernels = [e for e in events if e.device_type != DeviceType.CPU and e.name not in LABELS]
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
        "unet_attention_share_of_unet": attention / unet if unet and attention is not None else None,
        "attention_patterns": list(ATTENTION_PATTERNS),
    }


def markdown(summary: dict[str, Any]) -> str:
    seconds_kind = "device s" if summary["device_busy_seconds"] is not None else "wall s"
    lines = [f"| component | {seconds_kind} | share | host s | calls |", "|---|---:|---:|---:|---:|"]
    for r in summary["components"]:
        host = "" if r["host_seconds"] is None else f"{r['host_seconds']:.4f}"
        calls = "" if r["calls"] is None else str(r["calls"])
        lines.append(f"| {r['component']} | {r['seconds']:.4f} | {100 * r['share']:.1f}% | {host} | {calls} |")
        if r["component"] == "UNet" and summary["unet_attention_seconds"] is None:
            lines.append("| - of which attention | n/a | not visible (compiled ahead of time) | | |")
        elif r["component"] == "UNet":
            lines.append(
                f"| - of which attention | {summary['unet_attention_seconds']:.4f} | "
                f"{100 * summary['unet_attention_share_of_unet']:.1f}% of UNet | | |"
            )
    lines.append(f"| total | {summary['wall_seconds']:.4f} | 100.0% | | |")
    return "\n".join(lines)


def settings(pipeline: Pipeline) -> dict[str, Any]:
    m, s = pipeline.model, pipeline.sampling
    return {
        "task": pipeline.task, "device": device_name(m.device), "torch": torch.__version__, "config": str(m.files.config),
        "checkpoint": str(m.files.ckpt) if m.files.ckpt else "random weights", "sampler": s.sampler,
        "steps": s.steps, "H": pipeline.height, "W": pipeline.width, "n_samples": pipeline.n_samples, "scale": s.scale,
        "precision": m.settings.precision, "computes_in": m.computes_in, "attention": m.settings.attention, "compile": m.settings.compile,
        "sdpa_disabled": [n for n in ("flash", "mem_efficient", "math") if getattr(m.settings, f"disable_{n}")],
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
    model, output = Model(model_settings_from_args(args)), output_settings_from_args(args)
    sampling = sampling_from_args(args, args.task, model)
    pipeline = TASKS[args.task].from_args(model, sampling, output.n_samples, output.vae_slice_size, args)
    prompts = read_prompts(args.prompt, None, output.n_samples, pipeline.default_prompt)[0]
    try:
        prof, wall = profile_generation(pipeline, prompts)
    except RuntimeError as e:
        message = str(e)
        if "No available kernel" in message or "No viable backend" in message:
            raise GenerationError(f"the SDPA backends left enabled cannot run this model's attention: {message.splitlines()[0]}") from None
        raise
    summary = summarize(prof.events(), wall, model.device.type == "cuda")
    summary["settings"] = settings(pipeline)
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
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--task", choices=sorted(TASKS), default="txt2img")
    task = pre.parse_known_args(argv)[0].task  # the task decides which flags the full parser has
    parser = build_parser(task)
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
