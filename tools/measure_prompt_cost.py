#!/usr/bin/env python
"""What weighted and long prompts cost on the full SD2 model (random weights): the prompt
encoder's time for one to three 75-token chunks against the original one-call encoding, the
weighting's own time, and one guided UNet step with a 77- and a 154-token context.

Conditioning is computed once per batch, not per step: the UNet rows are the per-step cost.

    python tools/measure_prompt_cost.py --latent 32
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = {
    1: "a professional photograph of an astronaut riding a horse",
    2: "a (professional:1.2) photograph of an astronaut riding a horse on the moon, " * 7,
    3: "a [[quiet]] lake at dawn, mist over the water, pine trees, mountains behind, " * 10,
}


def best_of(runs: dict[str, Callable[[], object]], repeat: int) -> dict[str, float]:
    """Each run's best time of ``repeat``, after a warm-up, the runs interleaved: on a shared CPU
    other processes slow some calls down, never speed one up, and they slow all runs alike."""
    for run in runs.values():
        run()
    best = {name: float("inf") for name in runs}
    for _ in range(repeat):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def main(argv: list[str] | None = None) -> int:
    import torch

    from ldm.generation.model import Model
    from ldm.generation.settings import ModelSettings
    from ldm.modules.encoders.prompts import emphasize

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "stable-diffusion" / "v2-inference.yaml"))
    p.add_argument("--latent", type=int, default=32, help="latent side of the UNet step (64: 512x512 images)")
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args(argv)
    model = Model(ModelSettings(config=args.config, random_weights=True, device="cpu", precision="full"))
    net, encoder = model.load(), model.prompts
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    with torch.no_grad():
        for chunks, prompt in PROMPTS.items():
            assert encoder.count(prompt) == chunks, (chunks, encoder.count(prompt))
        runs = {"original get_learned_conditioning, 77 tokens": lambda: net.get_learned_conditioning([PROMPTS[1]])}
        runs.update({f"prompt encoder, {n} chunk(s)": (lambda p=p: encoder.encode([p])) for n, p in PROMPTS.items()})
        runs.update({f"parsing and chunking, {n} chunk(s)": (lambda p=p: encoder.chunks(p)) for n, p in PROMPTS.items()})
        z = encoder.encode([PROMPTS[2]]).reshape(-1, 77, net.cond_stage_model.model.token_embedding.embedding_dim)
        runs["A1111's weighting, 2 chunks"] = lambda: emphasize(z, torch.full(z.shape[:2], 1.1))
        x, t = torch.randn(2, 4, args.latent, args.latent), torch.tensor([500, 500])
        contexts = {n: torch.randn(2, n, z.shape[-1]) for n in (77, 154)}
        runs.update({f"UNet step, batch 2 (guided), {args.latent}x{args.latent} latents, context {n}":
                     (lambda c=c: net.apply_model(x, t, c)) for n, c in contexts.items()})
        for name, best in best_of(runs, args.repeat).items():
            print(f"{name}: {best * 1e3:.2f} ms" if best < 0.1 else f"{name}: {best:.3f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
