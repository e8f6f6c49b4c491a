"""Image to image with Stable Diffusion 2: the original scripts/img2img.py (DDIM: noise the init
image's latent by --strength of the steps, then denoise it under the prompt), with the flags
it shares with scripts/txt2img.py.

    python scripts/img2img.py --init-img sketch.png --prompt "a red circle" --strength 0.6

Every flag: ``--help`` and docs/txt2img.md.
"""

import sys

from ldm.generation import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], "img2img"))
