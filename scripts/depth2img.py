"""Depth-to-image with the SD2 512-depth model: a new image under the prompt with --image's depth
(MiDaS' estimate, or --depth-map).

    python scripts/depth2img.py --config configs/stable-diffusion/v2-midas-inference.yaml \\
        --ckpt 512-depth-ema.safetensors --image room.png --prompt "a medieval hall" --strength 0.8

Every flag: ``--help`` and docs/pipelines.md.
"""

import sys

from ldm.generation import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], "depth2img"))
