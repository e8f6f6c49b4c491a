"""x4 upscaling with the SD2 x4 upscaler: --image at four times its size, guided by the prompt.

    python scripts/upscale.py --config configs/stable-diffusion/x4-upscaling.yaml \\
        --ckpt x4-upscaler-ema.safetensors --image small.png --prompt "a professional photograph of a cat"

Every flag: ``--help`` and docs/pipelines.md.
"""

import sys

from ldm.generation import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], "upscale"))
