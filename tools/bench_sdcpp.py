#!/usr/bin/env python
"""stable-diffusion.cpp (``pip install stable-diffusion-cpp-python``, built from source) as a CPU peer:
seconds of one txt2img generation from an original-layout SD2 checkpoint, per weight type, for
BENCHMARKS.md beside scripts/benchmark.py's figures of the same checkpoint.

Each weight type loads its own model (the checkpoint converted at load), runs an untimed one-step
warm-up, then the timed generations (Euler, one UNet call per step: PLMS takes one more in all);
min / median / max over ``--repeats``.

    python tools/bench_sdcpp.py --ckpt random-weights.safetensors --H 512 --W 512 --steps 10 --types f32 f16 q8_0
"""

from __future__ import annotations

import argparse
import statistics
import time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="an original-layout SD2 checkpoint (.safetensors or .ckpt)")
    p.add_argument("--types", nargs="+", default=["f32", "f16", "q8_0"], help="stable-diffusion.cpp weight types")
    p.add_argument("--H", type=int, default=512)
    p.add_argument("--W", type=int, default=512)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--scale", type=float, default=9.0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--prompt", default="A photo")
    args = p.parse_args()
    from stable_diffusion_cpp import StableDiffusion

    for wtype in args.types:
        start = time.perf_counter()
        sd = StableDiffusion(model_path=args.ckpt, wtype=wtype, n_threads=args.threads, verbose=False)
        loaded = time.perf_counter() - start

        def generate(steps: int) -> float:
            begin = time.perf_counter()
            sd.generate_image(prompt=args.prompt, width=args.W, height=args.H, cfg_scale=args.scale, sample_method="euler",
                              sample_steps=steps, seed=1)
            return time.perf_counter() - begin

        warm = generate(1)
        times = sorted(generate(args.steps) for _ in range(args.repeats))
        print(f"stable-diffusion.cpp {wtype}: {args.W}x{args.H}, {args.steps} Euler steps, {args.threads} threads: "
              f"{times[0]:.2f} / {statistics.median(times):.2f} / {times[-1]:.2f} s (load {loaded:.1f} s, 1-step warm-up {warm:.1f} s)",
              flush=True)
        del sd


if __name__ == "__main__":
    main()
