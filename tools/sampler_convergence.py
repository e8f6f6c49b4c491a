"""How close each deterministic sampler and schedule comes to the converged image, per UNet call.

Every sampler solves the same probability-flow ODE from the same starting noise; run long enough,
they all reach the same image. This measures, on a trained model (by default the embedded demo
model, whose errors mean something, unlike random weights'), the distance of each sampler x
schedule x step count to a converged reference of the same seeds, prompts and guidance:

* the k-samplers end at sigma = 0; their reference is DPM++ 2M on the Karras schedule at
  ``--reference_steps`` steps (checked against Heun at as many steps: ``reference_spread``);
* the original DDIM, PLMS and DPM-Solver++ end one step short, at the table's first noise level
  (``alphas_cumprod[0]``), as the original code does; their reference is DDIM at 500 steps, which
  ends there too. ``endpoints`` is the distance between the two references (what that last step
  changes).

Distances: latent RMS, and mean absolute pixel difference in 0-255 of the decoded images, each
averaged over the batch. Stochastic samplers (ancestral, SDE, DDPM, LCM) draw new noise at every
step, so they converge to a different image at every step count: they are not measured.

Usage: python tools/sampler_convergence.py [--config C --ckpt K] --json out.json --plot out.png
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from ldm.fileio import write_text
from ldm.generation.model import Model
from ldm.generation.settings import ModelSettings
from ldm.models.diffusion.samplers import SAMPLERS
from ldm.models.diffusion.sampling import SampleRequest

DETERMINISTIC = ("ddim", "plms", "dpm", "euler", "heun", "lms", "dpm_2", "dpmpp_2m", "unipc")
SCHEDULES = ("uniform", "karras", "exponential", "normal", "simple", "trailing", "beta")
STEPS = (5, 10, 15, 20, 30, 50)
DEMO_PROMPTS = ("a red circle", "a green square", "a blue triangle", "a yellow circle")


def sample(model, name: str, schedule: str | None, steps: int, cond, uncond, noise: torch.Tensor, scale: float) -> torch.Tensor:
    sampler = SAMPLERS[name]
    request = SampleRequest(cond=cond, uncond=uncond, scale=scale, steps=steps, shape=tuple(noise.shape),
                            schedule=schedule or sampler.schedules[0], noise=noise, eta=0.0 if name == "ddim" else None)
    return sampler.sample(model, request)


def distances(model, latents: torch.Tensor, reference: torch.Tensor, reference_pixels: torch.Tensor) -> dict[str, float]:
    pixels = pixels_of(model, latents)
    return {
        "latent_rms": ((latents - reference).pow(2).mean(dim=(1, 2, 3)).sqrt().mean()).item(),
        "pixel_mad": ((pixels - reference_pixels).abs().mean()).item(),
    }


def pixels_of(model, latents: torch.Tensor) -> torch.Tensor:
    return (torch.clamp((model.decode_first_stage(latents) + 1) / 2, 0, 1) * 255).round()


def measure(args: argparse.Namespace) -> dict:
    model_ = Model(ModelSettings(config=args.config, ckpt=args.ckpt, device="cpu", precision="full"))
    model = model_.load()
    prompts = list(args.prompts or DEMO_PROMPTS)
    seeds = list(range(args.seeds))
    batch = [(p, s) for s in seeds for p in prompts]
    shape = (model.channels, model_.geometry.latent_size, model_.geometry.latent_size)
    noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for _, s in batch])
    results: dict = {"model": str(model_.files.config), "scale": args.scale, "prompts": prompts, "seeds": seeds, "runs": []}
    with torch.no_grad(), model.ema_scope():
        cond = model.get_learned_conditioning([p for p, _ in batch])
        uncond = model.get_learned_conditioning([""] * len(batch))
        start = time.perf_counter()
        ref_k = sample(model, "dpmpp_2m", "karras", args.reference_steps, cond, uncond, noise, args.scale)
        heun = sample(model, "heun", "karras", args.reference_steps, cond, uncond, noise, args.scale)
        ref_original = sample(model, "ddim", None, 500, cond, uncond, noise, args.scale)
        refs = {"k": (ref_k, pixels_of(model, ref_k)), "original": (ref_original, pixels_of(model, ref_original))}
        results["reference_spread"] = distances(model, heun, *refs["k"])
        results["endpoints"] = distances(model, ref_original, *refs["k"])
        print(f"references in {time.perf_counter() - start:.1f} s; Heun vs DPM++ 2M: {results['reference_spread']}; "
              f"original's endpoint vs sigma 0: {results['endpoints']}", flush=True)
        for name in DETERMINISTIC:
            sampler = SAMPLERS[name]
            schedules = [s for s in SCHEDULES if s in sampler.schedules] or [sampler.schedules[0]]
            group = "k" if name not in ("ddim", "plms", "dpm") else "original"
            for schedule in schedules:
                for steps in STEPS:
                    if name == "dpm" and steps < 2:
                        continue
                    run_steps = sampler.run_steps(steps, schedule, model.num_timesteps)
                    latents = sample(model, name, schedule, steps, cond, uncond, noise, args.scale)
                    row = {"sampler": name, "schedule": schedule, "steps": steps, "unet_calls": sampler.unet_calls(run_steps),
                           **distances(model, latents, *refs[group])}
                    results["runs"].append(row)
                    print(f"{name:>9} {schedule:>11} {steps:3d} steps {row['unet_calls']:3d} calls: "
                          f"latent RMS {row['latent_rms']:.5f}, pixels {row['pixel_mad']:.3f}", flush=True)
    return results


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 6))
    best: dict[str, str] = {}
    for name in dict.fromkeys(r["sampler"] for r in runs):
        mine = [r for r in runs if r["sampler"] == name]
        by_schedule: dict[str, list] = {}
        for r in mine:
            by_schedule.setdefault(r["schedule"], []).append(r)
        # The schedule with the smallest error summed over step counts (in log).
        best[name] = min(by_schedule, key=lambda s: sum(math.log(max(r["latent_rms"], 1e-9)) for r in by_schedule[s]))
        rows = by_schedule[best[name]]
        for axis, key in ((left, "latent_rms"), (right, "pixel_mad")):
            axis.plot([r["unet_calls"] for r in rows], [max(r[key], 1e-6) for r in rows], marker="o",
                      linestyle="--" if name in ("ddim", "plms", "dpm") else "-", label=f"{name} ({best[name]})")
    plms_50 = next((r for r in runs if r["sampler"] == "plms" and r["steps"] == 50), None)
    for axis, key, label in ((left, "latent_rms", "latent RMS distance"), (right, "pixel_mad", "mean |pixel difference| (0-255)")):
        if plms_50:
            axis.axhline(plms_50[key], color="grey", linestyle=":", linewidth=1)
            axis.axvline(0.4 * plms_50["unet_calls"], color="grey", linestyle=":", linewidth=1)
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xlabel("UNet calls per image")
        axis.set_ylabel(label)
        axis.grid(True, which="both", alpha=0.3)
    left.legend(fontsize=8)
    fig.suptitle(f"Distance to the converged image, {Path(results['model']).name}, guidance {results['scale']}, "
                 f"{len(results['prompts']) * len(results['seeds'])} images; each sampler on its best schedule; "
                 "dotted: PLMS 50 steps' distance, 40% of its UNet calls")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", type=Path, default=None, help="model config (default: the embedded demo model)")
    p.add_argument("--ckpt", type=Path, default=None)
    p.add_argument("--prompts", nargs="*", default=None, help="prompts (default: four the demo model knows)")
    p.add_argument("--seeds", type=int, default=4, help="seeds per prompt (default: %(default)s)")
    p.add_argument("--scale", type=float, default=9.0, help="guidance scale (default: %(default)s)")
    p.add_argument("--reference_steps", type=int, default=1000, help="steps of the converged references (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", type=Path, default=None, help="write every measurement here")
    p.add_argument("--plot", type=Path, default=None, help="write the plot here (PNG)")
    p.add_argument("--from_json", type=Path, default=None, help="plot the measurements of this file instead of measuring")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = json.loads(args.from_json.read_text()) if args.from_json else measure(args)
    if args.json:
        write_text(args.json, json.dumps(results, indent=1) + "\n", overwrite=True)
    if args.plot:
        plot(results, args.plot)


if __name__ == "__main__":
    main()
