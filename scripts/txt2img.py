"""Text to image with Stable Diffusion 2: the original scripts/txt2img.py interface, plus flags
for speed and benchmarking (--compile, SDPA backends, --skip_first, --time_file, ...).

    python scripts/txt2img.py --prompt "a red circle"
    python scripts/txt2img.py --config configs/stable-diffusion/v2-inference.yaml --ckpt v2-1_512-ema-pruned.ckpt \\
        --prompt "a professional photograph of an astronaut riding a horse"

Every flag: ``--help`` and docs/txt2img.md.
"""

import sys

from ldm.generation import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], "txt2img"))
