"""Measure what building the full SD2 model and loading a full-size checkpoint costs.

Compares (a) the naive path, building the model on the CPU with random initialisation
(what a plain ``instantiate_from_config`` pays before any weights are loaded), with
(b) this package's path, ``ldm.loading.load_model_from_config``: build on the meta device
(no allocation, no initialisation) and adopt the file's tensors. The checkpoint is the
randomly initialised model of (a) written as fp16 safetensors (half the disk and read
time of fp32; released SD2 files are fp32, about twice as large) to a temporary folder,
so reads come from a warm page cache; (d) loads the same weights written as a diffusers
folder, converted as they load.

Usage: python tools/measure_load.py [--config configs/stable-diffusion/v2-inference.yaml]
Needs about 8 GiB of free memory (fp32 model plus its fp16 copy).
"""

from __future__ import annotations

import argparse
import functools
import gc
import tempfile
import time
from pathlib import Path
from typing import Callable, TypeVar

import torch

from ldm.checkpoint import apply_state_dict, load_state_dict, save_state_dict
from ldm.diffusers_format import save_folder
from ldm.loading import build_model, load_config, load_model_from_config

T = TypeVar("T")
ROOT = Path(__file__).resolve().parents[1]


def timed(label: str, results: dict[str, float], fn: Callable[[], T]) -> T:
    start = time.perf_counter()
    out = fn()
    results[label] = time.perf_counter() - start
    print(f"{label:<48} {results[label]:8.2f} s", flush=True)
    return out


def touch(tensors) -> None:
    """Read one byte per page of every tensor: safetensors maps the file lazily, so this is
    where a mapped tensor is actually read from disk or page cache."""
    for t in tensors:
        if t.numel():
            t.detach().reshape(-1).view(torch.uint8)[::4096].sum()


def read_bytes(path: Path) -> int:
    """The floor: the file's bytes into memory, nothing else."""
    data = bytearray(path.stat().st_size)
    with open(path, "rb", buffering=0) as f:
        return f.readinto(memoryview(data))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "stable-diffusion" / "v2-inference.yaml")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, config {args.config}")
    results: dict[str, float] = {}

    with tempfile.TemporaryDirectory(prefix="measure_load.") as folder:
        path = Path(folder) / "sd2-random-fp16.safetensors"
        model = timed("(a) build on CPU with random init", results, lambda: build_model(args.config, "cpu"))
        n_params = sum(p.numel() for p in model.parameters())
        state = {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
        del model
        gc.collect()
        timed("    write fp16 safetensors (not part of loading)", results, functools.partial(save_state_dict, state, path))
        save_folder(state, load_config(args.config), Path(folder) / "diffusers")
        del state
        gc.collect()
        size_gb = path.stat().st_size / 1e9
        print(f"    {n_params / 1e9:.3f} B parameters, file {size_gb:.2f} GB")

        timed("(r)  read the raw bytes (the floor)", results, lambda: read_bytes(path))

        def read_state():
            state = load_state_dict(path)
            touch(state.values())
            return state

        state = timed("(b1) load_state_dict + read every page", results, read_state)
        meta = timed("(b2) build on meta", results, lambda: build_model(args.config, "meta"))
        timed("(b3) assign the tensors (apply_state_dict)", results, functools.partial(apply_state_dict, meta, state, assign=True))
        del state, meta
        gc.collect()

        def load(dtype, source=path):
            model = load_model_from_config(args.config, source, dtype=dtype)
            touch([*model.parameters(), *model.buffers()])
            return model

        for dtype in (torch.float16, torch.float32):
            label = f"(b)  load_model_from_config, {str(dtype).removeprefix('torch.')}, read"
            model = timed(label, results, lambda: load(dtype))
            del model
            gc.collect()
        model = timed("(d)  the same, float16, from a diffusers folder", results,
                      lambda: load(torch.float16, Path(folder) / "diffusers"))
        del model
        gc.collect()

    read = results["(b1) load_state_dict + read every page"]
    overhead = results["(b2) build on meta"] + results["(b3) assign the tensors (apply_state_dict)"]
    print(f"build on meta + assign, on top of reading the file: {overhead:.2f} s ({100 * overhead / read:.0f}% of the read)")
    print(f"the naive path would first spend {results['(a) build on CPU with random init']:.2f} s on random init")
    folder = results["(d)  the same, float16, from a diffusers folder"] - results["(b)  load_model_from_config, float16, read"]
    print(f"a diffusers folder instead of the file: {folder:+.2f} s")


if __name__ == "__main__":
    main()
