"""Text to image with Stable Diffusion 2: the original scripts/txt2img.py interface, plus flags
for speed and benchmarking (--compile, SDPA backends, --skip_first, --time_file, ...).

    python scripts/txt2img.py --prompt "a red circle"
    python scripts/txt2img.py --config configs/stable-diffusion/v2-inference.yaml --ckpt v2-1_512-ema-pruned.ckpt \\
        --prompt "a professional photograph of an astronaut riding a horse"

Every flag: ``--help`` and docs/txt2img.md.
"""

import sys

import numpy as np
from PIL import Image

from ldm.generation import main
from ldm.generation.images import encode_watermark


def put_watermark(img: Image.Image, wm_encoder=None) -> Image.Image:
    """``img`` with the invisible watermark of ``wm_encoder`` (an imwatermark ``WatermarkEncoder``),
    or unchanged without one: the original script's helper, which its demos import from here."""
    if wm_encoder is None:
        return img
    return Image.fromarray(encode_watermark(np.array(img.convert("RGB")), wm_encoder))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], "txt2img"))
