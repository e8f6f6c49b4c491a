#!/usr/bin/env python
"""Measure a generation's peak memory against the estimate that refuses impossible runs
(ldm/generation/memory.py), for a table like the one in docs/memory.md.

Each case runs in a fresh child process (one sampling step, random weights, nothing written);
the child reports its peak resident set size (CPU) or ``torch.cuda.max_memory_allocated`` (CUDA).
The process's own baseline (Python, torch, the child before the model is built) is measured too
and reported beside the peak: the estimate covers what the run adds to it.

    python tools/measure_memory.py --config configs/stable-diffusion/v2-inference.yaml \\
        --sizes 256 512 --batches 1 2 --precision full autocast
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing
import resource
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30


def _child(config: str, size: int, batch: int, precision: str, attention: str, device: str, queue) -> None:
    import torch

    from ldm.generation.memory import estimate
    from ldm.generation.model import Model
    from ldm.generation.run import seed_everything
    from ldm.generation.settings import ModelSettings, SamplingSettings
    from ldm.generation.tasks import Txt2ImgPipeline

    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    model = Model(ModelSettings(config=config, random_weights=True, device=device, precision=precision, attention=attention))
    pipeline = Txt2ImgPipeline(model, SamplingSettings(sampler="ddim", steps=1), n_samples=batch, height=size, width=size)
    predicted = estimate(model, size, size, batch, True, pipeline.vae_slice_size)
    net = model.load()
    with torch.no_grad(), model.backends(), net.ema_scope(), model.precision():
        seed_everything(0)
        pipeline.start()
        pipeline(batch * ["a photo"])
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline
    queue.put({"size": size, "batch": batch, "precision": precision, "attention": attention, "device": device,
               "baseline_gib": baseline / GIB, "peak_gib": peak / GIB, "estimate_gib": predicted.total / GIB,
               "weights_gib": predicted.weights / GIB, "unet_gib": predicted.unet / GIB, "decoder_gib": predicted.decoder / GIB})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "stable-diffusion" / "v2-inference.yaml"))
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    p.add_argument("--batches", type=int, nargs="+", default=[1])
    p.add_argument("--precision", nargs="+", default=["full"], choices=["full", "autocast", "bf16"])
    p.add_argument("--attention", nargs="+", default=["sdpa"], choices=["sdpa", "vanilla"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    args = p.parse_args(argv)
    context = multiprocessing.get_context("spawn")
    rows = []
    print("| size | batch | precision | attention | measured peak GiB | estimate GiB | estimate / measured |")
    print("|---:|---:|---|---|---:|---:|---:|")
    for size, batch, precision, attention in itertools.product(args.sizes, args.batches, args.precision, args.attention):
        queue = context.Queue()
        child = context.Process(target=_child, args=(args.config, size, batch, precision, attention, args.device, queue))
        child.start()
        row = queue.get()
        child.join()
        rows.append(row)
        print(f"| {size} | {batch} | {precision} | {attention} | {row['peak_gib']:.2f} | {row['estimate_gib']:.2f} | "
              f"{row['estimate_gib'] / row['peak_gib']:.2f} |", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
