#!/usr/bin/env python
"""The cost of a ControlNet per sampling step: the full-size SD2 UNet alone against the UNet with
one SD2.1 ControlNet (random weights), a guided batch of 2, in interleaved rounds; min/median/max
seconds, the median ratio, and the ratio of their FLOPs (what the ratio should be: the ControlNet
is the UNet's encoder half). A measurement, not a test.

    python tools/bench_controlnet.py --latent 32 64 --repeats 5            # 256 and 512 px, eager
    python tools/bench_controlnet.py --latent 32 --compile                  # compiled (CPU: AOT, frozen)
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from ldm.generation.speed import compile_module
from ldm.loading import build_model, load_config
from ldm.modules.diffusionmodules.controlnet import Control, ControlNet, control_residuals, controlnet_params

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, default=ROOT / "configs" / "stable-diffusion" / "v2-inference.yaml")
    p.add_argument("--latent", type=int, nargs="+", default=[32, 64], help="latent sides: 32 is 256 px, 64 is 512 px")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--compile", action="store_true", help="compile both networks as --compile does")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    net = build_model(args.config, "cpu").eval()
    unet = net.model.diffusion_model
    controlnet = ControlNet(**controlnet_params(load_config(args.config).model.params.unet_config.params)).eval()
    if args.compile:
        compile_module(unet, "cpu")
        compile_module(controlnet, "cpu")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {'compiled' if args.compile else 'eager'}")
    for side in args.latent:
        x, t = torch.randn(2, 4, side, side), torch.tensor([500, 500])
        context = torch.randn(2, 77, 1024)
        control = [Control(controlnet, torch.rand(2, 3, 8 * side, 8 * side), torch.ones(2))]

        def alone():
            return unet(x, t, context=context)

        def controlled():
            return unet(x, t, context=context, control=control_residuals(control, x, t, context))

        with torch.no_grad():
            if not args.compile:
                flops = []
                for fn in (alone, controlled):
                    with FlopCounterMode(display=False) as counter:
                        fn()
                    flops.append(counter.get_total_flops())
            for fn in (alone, controlled):
                fn()  # warm-up (compilation)
            times: dict[str, list[float]] = {"UNet": [], "UNet + ControlNet": []}
            for _ in range(args.repeats):
                for name, fn in (("UNet", alone), ("UNet + ControlNet", controlled)):
                    start = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - start)
        medians = {k: statistics.median(v) for k, v in times.items()}
        for name, values in times.items():
            print(f"{8 * side} px  {name:18s} min {min(values):.3f} s  median {statistics.median(values):.3f} s  max {max(values):.3f} s")
        share = f", FLOPs ratio {flops[1] / flops[0]:.3f}" if not args.compile else ""
        print(f"{8 * side} px  time ratio (medians) {medians['UNet + ControlNet'] / medians['UNet']:.3f}{share}")


if __name__ == "__main__":
    main()
