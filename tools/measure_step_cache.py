#!/usr/bin/env python
"""What step caching (``--cache_interval N --cache_depth D``, DeepCache) costs and gains.

``speed``: one full UNet call against one shallow call of each depth, full-size SD2 UNet with random
weights (the same every run), batch 2 (a guided image), at the given latent sizes, in the default
precision of this CPU (bfloat16 weights under autocast where it is native); repeats interleaved,
min / median / max seconds; and the relative error of a shallow call one DDIM-50 step later (random
weights: a scale, not a quality measure).

``fidelity``: on the embedded demo model (trained: its distances mean something), the images of
each sampler at its step count with caching against the same sampler without it (mean |pixel
difference| in 0-255 and latent RMS, averaged over the prompts x seeds), next to the same sampler
with fewer steps and no caching, the other way to spend fewer UNet calls.

    python tools/measure_step_cache.py speed --latent 32 64 --repeats 3
    python tools/measure_step_cache.py fidelity --json step-cache.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch

from ldm.fileio import write_text
from ldm.generation.model import Model
from ldm.generation.settings import ModelSettings
from ldm.modules.diffusionmodules.deepcache import StepCache

ROOT = Path(__file__).resolve().parents[1]
DEMO_PROMPTS = ("a red circle", "a green square", "a blue triangle", "a yellow circle")
# (sampler, schedule, steps, the fewer steps to compare with)
RUNS = (("plms", "uniform", 50, (15, 20, 25, 30)), ("ddim", "uniform", 50, (15, 20, 25, 30)),
        ("dpmpp_2m", "karras", 20, (8, 10, 12, 15)))


def speed(args: argparse.Namespace) -> None:
    model = Model(ModelSettings(config=ROOT / "configs/stable-diffusion/v2-inference.yaml", random_weights=True, device="cpu"))
    unet = model.load().model.diffusion_model
    with torch.no_grad():  # the zero-initialised output layers random too: else the errors are of an identity
        gen = torch.Generator().manual_seed(1)
        for p in unet.parameters():
            if p.ndim > 1 and not p.any():
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p[0].numel()))
    print(f"precision {model.computes_in}, {torch.get_num_threads()} threads, torch {torch.__version__}", flush=True)
    for size in args.latent:
        gen = torch.Generator().manual_seed(0)
        x, t, c = torch.randn(2, 4, size, size, generator=gen), torch.tensor([801, 801]), torch.randn(2, 77, 1024, generator=gen)
        caches = {d: StepCache(unet, 2, d) for d in args.depths}
        times: dict[str, list[float]] = {"full": [], **{f"depth {d}": [] for d in args.depths}}
        with torch.no_grad(), model.precision():
            kept = {d: caches[d].full(x, t, c)[1] for d in args.depths}
            for _ in range(args.repeats):
                start = time.perf_counter()
                unet(x, t, c)
                times["full"].append(time.perf_counter() - start)
                for d in args.depths:
                    start = time.perf_counter()
                    caches[d].shallow(x, t, kept[d], c)
                    times[f"depth {d}"].append(time.perf_counter() - start)
            # Relative error of a shallow call at a later step (features kept at t=801) against the full call there.
            x2, t2 = x + 0.1 * torch.randn(x.shape, generator=gen), torch.tensor([761, 761])
            exact = unet(x2, t2, c).float()
            errors = {d: ((caches[d].shallow(x2, t2, kept[d], c).float() - exact).norm() / exact.norm()).item() for d in args.depths}
        full = statistics.median(times["full"])
        for name, values in times.items():
            print(f"{size * 8} px  {name:>8}: {min(values):.3f} / {statistics.median(values):.3f} / {max(values):.3f} s"
                  f"  ({statistics.median(values) / full:.3f} of a full call)", flush=True)
        print(f"{size * 8} px  relative error (L2) of a shallow call at t=761 on features of t=801: "
              + ", ".join(f"depth {d} {e:.3g}" for d, e in errors.items()), flush=True)


def fidelity(args: argparse.Namespace) -> None:
    from ldm.models.diffusion.samplers import SAMPLERS
    from ldm.models.diffusion.sampling import SampleRequest

    m = Model(ModelSettings(device="cpu", precision="full"))
    net = m.load()
    unet = net.model.diffusion_model
    batch = [(p, s) for s in range(args.seeds) for p in DEMO_PROMPTS]
    shape = (net.channels, m.geometry.latent_size, m.geometry.latent_size)
    noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for _, s in batch])
    rows = []
    with torch.no_grad():
        cond = net.get_learned_conditioning([p for p, _ in batch])
        uncond = net.get_learned_conditioning([""] * len(batch))

        def sample(name: str, schedule: str, steps: int, cache: StepCache | None = None) -> torch.Tensor:
            request = SampleRequest(cond=cond, uncond=uncond, scale=args.scale, steps=steps, shape=tuple(noise.shape),
                                    schedule=schedule, noise=noise, eta=0.0 if name == "ddim" else None)
            if cache is None:
                return SAMPLERS[name].sample(net, request)
            unet.forward = cache
            try:
                with cache:
                    return SAMPLERS[name].sample(net, request)
            finally:
                del unet.forward

        def pixels(z: torch.Tensor) -> torch.Tensor:
            return (torch.clamp((net.decode_first_stage(z) + 1) / 2, 0, 1) * 255).round()

        for name, schedule, steps, fewer in RUNS:
            reference = sample(name, schedule, steps)
            ref_pixels = pixels(reference)

            def row(z: torch.Tensor, **what) -> None:
                entry = {"sampler": name, "schedule": schedule, **what,
                         "latent_rms": (z - reference).pow(2).mean(dim=(1, 2, 3)).sqrt().mean().item(),
                         "pixel_mad": (pixels(z) - ref_pixels).abs().mean().item()}
                rows.append(entry)
                print(json.dumps(entry), flush=True)

            for interval in args.intervals:
                for depth in args.depths:
                    cache = StepCache(unet, interval, depth)
                    z = sample(name, schedule, steps, cache)
                    row(z, steps=steps, interval=interval, depth=depth, full_calls=cache.full_calls, shallow_calls=cache.shallow_calls)
            for few in fewer:
                cache = StepCache(unet, 1)
                z = sample(name, schedule, few, cache)
                row(z, steps=few, interval=1, depth=None, full_calls=cache.full_calls, shallow_calls=0)
    if args.json:
        write_text(args.json, json.dumps({"prompts": DEMO_PROMPTS, "seeds": args.seeds, "scale": args.scale, "rows": rows}, indent=1),
                   overwrite=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    s = sub.add_parser("speed")
    s.add_argument("--latent", type=int, nargs="+", default=[32, 64])
    s.add_argument("--depths", type=int, nargs="+", default=[0, 1, 2])
    s.add_argument("--repeats", type=int, default=3)
    f = sub.add_parser("fidelity")
    f.add_argument("--intervals", type=int, nargs="+", default=[2, 3, 5])
    f.add_argument("--depths", type=int, nargs="+", default=[0, 1, 2])
    f.add_argument("--seeds", type=int, default=4)
    f.add_argument("--scale", type=float, default=7.5)
    f.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    speed(args) if args.what == "speed" else fidelity(args)


if __name__ == "__main__":
    main()
