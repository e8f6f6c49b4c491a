#!/usr/bin/env python
"""Time one forward pass of the full-size SD2 UNet with each attention implementation.

Random weights (seeded), random latents, timesteps and text context; every implementation
runs in this one process on the same weights, in interleaved rounds (so that a change of
machine load hits all of them alike), and the table gives min/median/max milliseconds and the
median's speed-up over ``vanilla``. Each output is also compared with vanilla's and checked
for inf/NaN (the point of float16 runs). A measurement, not a test.

    python tools/bench_unet.py                                   # CPU, float32, 32x32, batch 2
    python tools/bench_unet.py --device cuda --dtype float16 --latent 64 96 --sdpa-backends
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ldm.generation.speed import compiled_forward, use_compile_cache
from ldm.loading import build_model, load_config
from ldm.modules.attention import IMPLEMENTATIONS, sdpa_backends, set_attention_implementation
from ldm.native_mha import to_native

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "configs" / "stable-diffusion" / "v2-inference.yaml"
BACKEND_FLAGS = {
    "flash": dict(disable_mem_efficient=True, disable_math=True),
    "mem_efficient": dict(disable_flash=True, disable_math=True),
    "math": dict(disable_flash=True, disable_mem_efficient=True),
}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="original-layout config whose UNet is timed")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32")
    p.add_argument("--latent", type=int, nargs="+", default=[32], help="latent side(s): 64 is 512 px, 96 is 768 px")
    p.add_argument("--batch", type=int, default=2, help="2 = one prompt under classifier-free guidance")
    p.add_argument("--repeats", type=int, default=5, help="timed forwards per implementation")
    p.add_argument("--warmup", type=int, default=1, help="untimed forwards first, at least 1 (compilation happens here)")
    p.add_argument(
        "--implementations", nargs="+", default=None,
        help="of vanilla, sdpa, xformers, native, native-compiled (default: all available)",
    )
    p.add_argument("--sdpa-backends", action="store_true", help="also run sdpa and native with one SDPA backend each")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode for native-compiled (default: PyTorch's)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (CPU)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


@torch.no_grad()
def randomize(module: nn.Module, seed: int) -> nn.Module:
    """Seeded random weights of unit-scale activations everywhere, the zero-initialised output
    layers included (with those zero the UNet would output zeros and compare nothing)."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        if p.ndim == 1 and "norm" in name and name.endswith("weight"):
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
        else:
            fan_in = p[0].numel() if p.ndim > 1 else p.numel()
            p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(fan_in))
    return module


def build_unets(config_path: Path, native: bool, seed: int) -> tuple[nn.Module, nn.Module | None]:
    """The config's UNet with random weights, and (if ``native``) its native-MHA twin holding
    the same tensors (the non-attention ones shared, not copied)."""
    config = load_config(config_path)
    unet_config = config.model.params.unet_config
    unet = build_model({"model": unet_config}, "meta")
    unet = randomize(unet.to_empty(device="cpu"), seed).eval()
    if not native:
        return unet, None
    unet_config.params.use_native_mha = True
    twin = build_model({"model": unet_config}, "meta")
    twin.load_state_dict(to_native(unet.state_dict()), strict=True, assign=True)
    return unet, twin.eval()


@dataclass
class Row:
    name: str
    times: list[float] = field(default_factory=list)
    setup_s: float = 0.0
    diff: float | None = None  # max |out - vanilla's| / max |vanilla's|
    finite: bool | None = None
    error: str | None = None


Run = tuple[Callable[[], None], Callable[..., torch.Tensor]]


def plan(args: argparse.Namespace, unet: nn.Module, twin: nn.Module | None) -> dict[str, Run]:
    """name -> (prepare, forward) for each implementation (and SDPA backend) asked for; prepare
    (choosing the kernel of the shared original-layout UNet) runs before the clock starts."""
    wanted = args.implementations or [*IMPLEMENTATIONS, "native", "native-compiled"]

    def timed(module: Callable[..., torch.Tensor], backend: str | None) -> Callable[..., torch.Tensor]:
        def forward(*inputs):
            with sdpa_backends(**BACKEND_FLAGS.get(backend, {})):
                return module(*inputs)
        return forward

    def original(impl: str, backend: str | None = None) -> Run:
        return (lambda: set_attention_implementation(unet, impl)), timed(unet, backend)

    def native(module: Callable[..., torch.Tensor], backend: str | None = None) -> Run:
        return (lambda: None), timed(module, backend)

    runs: dict[str, Run] = {}
    for name in wanted:
        if name in IMPLEMENTATIONS:
            runs[name] = original(name)
        elif name == "native":
            runs[name] = native(twin)
        elif name == "native-compiled":  # as --compile: on the CPU with frozen weights
            runs[name] = native(compiled_forward(twin, args.device, args.compile_mode))
        else:
            raise SystemExit(f"unknown implementation {name!r}")
    if args.sdpa_backends:
        for backend in BACKEND_FLAGS:
            if "sdpa" in wanted:
                runs[f"sdpa [{backend}]"] = original("sdpa", backend)
            if "native" in wanted:
                runs[f"native [{backend}]"] = native(twin, backend)
    return runs


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(args: argparse.Namespace, latent: int, unet: nn.Module, twin: nn.Module | None, device: torch.device) -> list[Row]:
    dtype = DTYPES[args.dtype]
    gen = torch.Generator().manual_seed(args.seed + 1)
    context_dim = unet.input_blocks[1][1].transformer_blocks[0].attn2.to_k.in_features
    x = torch.randn(args.batch, unet.in_channels, latent, latent, generator=gen).to(device, dtype)
    t = torch.full((args.batch,), 981, dtype=torch.long, device=device)
    context = torch.randn(args.batch, 77, context_dim, generator=gen).to(device, dtype)
    runs = plan(args, unet, twin)
    rows = {name: Row(name) for name in runs}
    reference = None
    with torch.no_grad():
        for name, (prepare, forward) in runs.items():  # warm-up: kernels chosen, compilation done
            out = None
            try:
                prepare()
                start = time.perf_counter()
                for _ in range(max(args.warmup, 1)):
                    out = forward(x, t, context)
                sync(device)
                rows[name].setup_s = time.perf_counter() - start
                rows[name].finite = bool(out.isfinite().all())
                if reference is None and name == "vanilla":
                    reference = out.float()
                if reference is not None:
                    rows[name].diff = ((out.float() - reference).abs().max() / reference.abs().max()).item()
            except (RuntimeError, torch.OutOfMemoryError) as e:
                rows[name].error = str(e).splitlines()[0][:100]
            del out
        for _ in range(args.repeats):  # interleaved rounds
            for name, (prepare, forward) in runs.items():
                if rows[name].error:
                    continue
                prepare()
                sync(device)
                start = time.perf_counter()
                forward(x, t, context)
                sync(device)
                rows[name].times.append(time.perf_counter() - start)
    return list(rows.values())


def table(rows: list[Row]) -> str:
    base = next((statistics.median(r.times) for r in rows if r.name == "vanilla" and r.times), None)
    lines = [
        "| implementation | min ms | median ms | max ms | speed-up vs vanilla (median) | max rel. diff vs vanilla | finite | warm-up s |",
        "|---|---:|---:|---:|---:|---:|:---:|---:|",
    ]
    for r in rows:
        if r.error:
            lines.append(f"| {r.name} | - | - | - | - | - | - | failed: {r.error} |")
            continue
        med = statistics.median(r.times)
        speedup = f"{base / med:.2f}x" if base else "-"
        diff = "-" if r.diff is None else f"{r.diff:.2g}"
        lines.append(
            f"| {r.name} | {min(r.times) * 1e3:.0f} | {med * 1e3:.0f} | {max(r.times) * 1e3:.0f} | {speedup} | "
            f"{diff} | {'yes' if r.finite else 'NO'} | {r.setup_s:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    use_compile_cache()
    wanted = args.implementations or [*IMPLEMENTATIONS, "native", "native-compiled"]
    if "xformers" in wanted and args.implementations is None:
        from ldm.modules import attention

        if attention.xops is None or device.type != "cuda":
            wanted.remove("xformers")
        args.implementations = wanted
    unet, twin = build_unets(args.config, native=any(n.startswith("native") for n in wanted), seed=args.seed)
    unet.to(device, DTYPES[args.dtype])
    if twin is not None:
        twin.to(device, DTYPES[args.dtype])
    params = sum(p.numel() for p in unet.parameters())
    cpu = f", {torch.get_num_threads()} threads" if device.type == "cpu" else f", {torch.cuda.get_device_name(device)}"
    ok = True
    for latent in args.latent:
        rows = bench(args, latent, unet, twin, device)
        ok &= all(r.finite is not False for r in rows)
        print(
            f"\nUNet forward, {args.config.name} ({params / 1e6:.0f}M parameters), batch {args.batch}, "
            f"{latent}x{latent} latent, {args.dtype}, {device}{cpu}, torch {torch.__version__}; "
            f"{args.repeats} timed runs each after {args.warmup} warm-up\n"
        )
        print(table(rows))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
