#!/usr/bin/env python
"""Peak memory and time of decoding one latent whole against decoding it in tiles
(``ldm.generation.tiling``), e.g. the x4 upscaler's 512x512 latent to a 2048x2048 image.

Each way runs in a fresh child process (random weights; its peak resident set size on the CPU, or
``torch.cuda.max_memory_allocated`` on CUDA), beside the memory estimate the runs are checked with
and the relative difference between the two images.

    python tools/measure_tiled_decode.py --config configs/stable-diffusion/x4-upscaling.yaml --latent 512
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30


def _child(config: str, latent: int, tile: int | None, device: str, queue) -> None:
    import torch

    from ldm.generation.memory import estimate
    from ldm.generation.model import Model
    from ldm.generation.settings import ModelSettings
    from ldm.generation.tiling import decode_tiled

    torch.manual_seed(0)
    model = Model(ModelSettings(config=config, random_weights=True, device=device, precision="full"))
    f = model.geometry.vae_factor
    predicted = estimate(model, latent * f, latent * f, 1, True, 1, tile)
    vae_only = model.load().first_stage_model.eval()
    z = torch.randn(1, model.geometry.channels, latent, latent, generator=torch.Generator().manual_seed(1)).to(device)
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    with torch.no_grad():
        image = decode_tiled(vae_only.decode, z, f, tile, tile // 4) if tile else vae_only.decode(z)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline
    queue.put({"tile": tile, "seconds": seconds, "peak_gib": peak / GIB, "decoder_estimate_gib": predicted.decoder / GIB,
               "image": image.cpu().numpy()})  # by value: the child's shared memory ends with it


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "stable-diffusion" / "x4-upscaling.yaml"))
    p.add_argument("--latent", type=int, default=512, help="latent side (x4 upscaler: the low-res image's side)")
    p.add_argument("--tile", type=int, default=64, help="tile side in latent pixels")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = p.parse_args(argv)
    context = multiprocessing.get_context("spawn")
    rows = []
    for tile in (None, args.tile):
        queue = context.Queue()
        child = context.Process(target=_child, args=(args.config, args.latent, tile, args.device, queue))
        child.start()
        rows.append(queue.get())
        child.join()
    whole, tiled = rows[0]["image"], rows[1]["image"]
    difference = float(((tiled - whole) ** 2).sum() ** 0.5 / (whole**2).sum() ** 0.5)
    print("| decoding | seconds | peak GiB (above baseline) | decoder estimate GiB |")
    print("|---|---:|---:|---:|")
    for row in rows:
        name = f"tiles of {row['tile']} latent px" if row["tile"] else "whole"
        print(f"| {name} | {row['seconds']:.1f} | {row['peak_gib']:.2f} | {row['decoder_estimate_gib']:.2f} |")
    print(f"\nrelative L2 difference, tiled vs whole: {difference:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
