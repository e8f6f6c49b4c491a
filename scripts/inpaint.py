"""Inpainting with the SD2 512-inpainting model: repaint the white part of --mask in --image.

    python scripts/inpaint.py --config configs/stable-diffusion/v2-inpainting-inference.yaml \\
        --ckpt 512-inpainting-ema.safetensors --image photo.png --mask mask.png --prompt "a red sofa"

Every flag: ``--help`` and docs/pipelines.md.
"""

import sys

from ldm.generation import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], "inpaint"))
