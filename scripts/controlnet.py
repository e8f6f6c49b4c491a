"""Text to image (or, with --init-img, image to image) guided by SD2.1 ControlNets: the txt2img or
img2img flags plus --control FILE[:WEIGHT[:START[:END]]] and --hint IMAGE, repeatable.

    python scripts/controlnet.py --ckpt v2-1_512-ema-pruned.safetensors --prompt "a house by a lake" \\
        --control control_v11p_sd21_canny.safetensors --hint photo.png --preprocess canny

Every flag: ``--help`` and docs/controlnet.md.
"""

import sys

from ldm.generation import main

if __name__ == "__main__":
    argv = sys.argv[1:]
    sys.exit(main(argv, "img2img" if any(a == "--init-img" or a.startswith("--init-img=") for a in argv) else "txt2img"))
