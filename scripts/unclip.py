"""Image variations with stable unCLIP (SD 2.1 unCLIP-H or -L): new images in the manner of --image.

    python scripts/unclip.py --config configs/stable-diffusion/v2-1-stable-unclip-h-inference.yaml \\
        --ckpt sd21-unclip-h.safetensors --image photo.png --noise_level 100

Every flag: ``--help`` and docs/pipelines.md.
"""

import sys

from ldm.generation import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], "variations"))
