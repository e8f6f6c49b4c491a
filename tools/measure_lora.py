"""Seconds to merge a LoRA into full-size SD2 and to switch it off again (restore), on random
weights: a kohya-format LoRA of rank RANK on every attention projection of the UNet and the text
encoder (the common kind), min/median/max over interleaved repeats.

    python tools/measure_lora.py --rank 16 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from ldm.checkpoint import save_state_dict
from ldm.loading import build_model
from ldm.lora import merge_loras, model_targets

SUFFIXES = ("attn1_to_q", "attn1_to_k", "attn1_to_v", "attn1_to_out_0", "attn2_to_q", "attn2_to_k", "attn2_to_v", "attn2_to_out_0",
            "_self_attn_q_proj", "_self_attn_k_proj", "_self_attn_v_proj", "_self_attn_out_proj")


def random_lora(net, rank: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    state = {}
    for name, target in model_targets(net).items():
        if name.startswith(("lora_unet_", "lora_te_")) and name.endswith(SUFFIXES):
            out, inp = target.weight.shape[:2]
            state[f"{name}.lora_down.weight"] = torch.randn(rank, inp, generator=gen) * 0.01
            state[f"{name}.lora_up.weight"] = torch.randn(out, rank, generator=gen) * 0.01
            state[f"{name}.alpha"] = torch.tensor(float(rank))
    return state


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/stable-diffusion/v2-inference.yaml")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    net = build_model(args.config, "cpu").eval()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "lora.safetensors"
        state = random_lora(net, args.rank)
        save_state_dict(state, path)
        print(f"LoRA: {len(state) // 3} modules, rank {args.rank}, {path.stat().st_size / 2**20:.1f} MiB")
        merges, restores = [], []
        merge = None
        for _ in range(args.repeats):
            start = time.perf_counter()
            merge = merge_loras(net, [(path, 1.0)], merge)
            merges.append(time.perf_counter() - start)
            start = time.perf_counter()
            merge.restore()
            restores.append(time.perf_counter() - start)
    for name, values in (("merge (read, check, add)", merges), ("restore (switch off)", restores)):
        print(f"{name}: min {min(values):.3f} s, median {statistics.median(values):.3f} s, max {max(values):.3f} s")


if __name__ == "__main__":
    main()
