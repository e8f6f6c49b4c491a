"""What a LoRA of the demo model changes (configs/demo/shapes-demo-lora.yaml teaches large shapes):
16 images (4 prompts x 4 seeds, DPM++ 2M Karras, 20 steps, scale 5) with and without it; the
coloured (not white) share of the pixels, and how often the image's centre has the prompt's colour.

    python tools/lora_effect.py logs/shapes-lora/model.safetensors [--grid grid.png]
"""

from __future__ import annotations

import argparse

import torch

from ldm.generation.model import Model
from ldm.generation.run import seed_everything
from ldm.generation.settings import ModelSettings, SamplingSettings
from ldm.generation.tasks import Txt2ImgPipeline

PROMPTS = ["a red circle", "a blue square", "a green triangle", "a yellow circle"]
CHANNEL = {"red": 0, "green": 1, "blue": 2}  # yellow has two: left out of the colour check


def images(loras: tuple) -> torch.Tensor:
    model = Model(ModelSettings(device="cpu", precision="full", loras=loras))
    pipe = Txt2ImgPipeline(model, SamplingSettings(sampler="dpmpp_2m", schedule="karras", steps=20, scale=5.0), n_samples=4)
    out = []
    with torch.no_grad():
        for seed in range(4):
            seed_everything(seed)
            pipe.start()
            out.append(pipe(PROMPTS))
    return torch.cat(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("lora")
    p.add_argument("--grid", default=None, help="also write the images, without and with the LoRA, as one PNG")
    args = p.parse_args()
    torch.set_num_threads(1)
    runs = {"without": images(()), "with": images(((args.lora, 1.0),))}
    for name, x in runs.items():
        area = (x.min(dim=1).values < 0.75).float().mean().item()
        centre = x[..., 12:20, 12:20].mean(dim=(2, 3))
        checks = [(i, CHANNEL[PROMPTS[i % 4].split()[1]]) for i in range(len(x)) if PROMPTS[i % 4].split()[1] in CHANNEL]
        right = sum(int(centre[i].argmax()) == c for i, c in checks)
        print(f"{name} the LoRA: coloured share of pixels {area:.3f}, centre in the prompt's colour {right}/{len(checks)}")
    if args.grid:
        from PIL import Image
        from torchvision.utils import make_grid

        grid = make_grid(torch.cat([runs["without"][:8], runs["with"][:8]]), nrow=8, padding=2)
        Image.fromarray((grid.permute(1, 2, 0).numpy() * 255).astype("uint8")).save(args.grid)


if __name__ == "__main__":
    main()
