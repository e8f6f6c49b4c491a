#!/usr/bin/env python
"""Convert a Stable Diffusion 2 checkpoint between the original attention layout and the
native-MHA layout (``use_native_mha: true`` configs), or back with ``--reverse``.

    python tools/convert_native_mha.py sd2.safetensors sd2_native_mha.safetensors --verify
    python tools/convert_native_mha.py --reverse sd2_native_mha.ckpt sd2.ckpt

Formats follow the extensions (.safetensors, or .ckpt/.pt/.pth) on each side. Layout details:
docs/attention.md.
"""

from __future__ import annotations

import argparse
import logging
import sys

from ldm.checkpoint import CheckpointError
from ldm.native_mha import LAYOUT_NAMES, NATIVE, ORIGINAL, AlreadyConverted, convert_checkpoint


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("input", help="checkpoint to convert (.safetensors or .ckpt)")
    parser.add_argument("output", help="where to write the converted checkpoint (.safetensors or .ckpt)")
    parser.add_argument("--reverse", action="store_true", help="convert native-MHA layout back to the original layout")
    parser.add_argument("--force", action="store_true", help="overwrite OUTPUT if it exists")
    parser.add_argument(
        "--verify", action="store_true", help="check every converted attention module's outputs against the other layout"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    target = ORIGINAL if args.reverse else NATIVE
    try:
        report = convert_checkpoint(args.input, args.output, target, overwrite=args.force, verify=args.verify)
    except AlreadyConverted as e:
        hint = "without --reverse" if args.reverse else "with --reverse to convert it back"
        print(f"error: {e}; nothing written. (Run {hint}, or use it as it is.)", file=sys.stderr)
        return 1
    except (CheckpointError, OSError) as e:  # OSError: missing, unwritable, disk full
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.output} ({LAYOUT_NAMES[target]} layout) from {args.input}")
    print(report.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
