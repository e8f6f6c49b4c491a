#!/usr/bin/env python
"""Convert a Stable Diffusion 2 model between a diffusers folder and an original-layout file.

    python tools/convert_diffusers.py stable-diffusion-2-1/ sd21-768-v.safetensors
    python tools/convert_diffusers.py v2-1_512-ema-pruned.safetensors sd21-base-diffusers/ \\
        --config configs/stable-diffusion/v2-inference.yaml

The direction follows the input: a diffusers folder (the one holding model_index.json; text-to-image
or inpainting, eps or v) becomes a single file, safetensors or .ckpt by the extension; a file
becomes a diffusers folder. A folder names its own config (its scheduler's prediction_type
decides eps or v, a 9-channel UNet is inpainting); a file needs --config, since nothing in it says
eps or v. Outputs are written atomically and never over an existing file or folder without
--overwrite. Scripts also take a diffusers folder as --ckpt directly. What does not carry over
(the text encoder's unused last layer, EMA weights) and why: docs/adapters.md.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ldm.checkpoint import CheckpointError, load_state_dict, save_state_dict
from ldm.diffusers_format import inspect_folder, save_folder, to_original
from ldm.diffusers_format.convert import check_complete
from ldm.loading import load_config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="\n\n".join(__doc__.split("\n\n")[1:]),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", type=Path, help="a diffusers folder, or an original-layout checkpoint (.safetensors or .ckpt)")
    parser.add_argument("output", type=Path, help="the original-layout file to write (.safetensors or .ckpt), or the diffusers folder")
    parser.add_argument("--config", type=Path, help="the model's config: required for a file; for a folder, default the "
                        "one it names (configs/stable-diffusion/v2-inference.yaml, v2-inference-v.yaml or v2-inpainting-inference.yaml)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    return parser.parse_args(argv)


def convert(args: argparse.Namespace) -> str:
    """Convert as ``args`` say; returns what was written, for the user."""
    if not args.input.exists():
        raise FileNotFoundError(f"{args.input}: no such file or folder")
    if args.output.exists() and not args.overwrite:
        raise FileExistsError(f"{args.output} exists; refusing to overwrite it (pass --overwrite)")
    if args.input.is_dir():
        folder = inspect_folder(args.input)
        config_path = args.config or folder.config_name
        config = load_config(args.config or folder.config_path)
        state = to_original(folder, config, "cpu", config_path)
        check_complete(state, config)
        save_state_dict(state, args.output, overwrite=args.overwrite)
        return (f"wrote {args.output} ({len(state)} tensors, the layout of {config_path}) from the diffusers {folder.family} "
                f"model in {args.input} ({folder.parameterization} prediction): use it with --config {config_path}")
    if args.config is None:
        raise CheckpointError(f"{args.input} is a file: pass --config, since nothing in a checkpoint says whether it predicts "
                              "eps (configs/stable-diffusion/v2-inference.yaml) or v (v2-inference-v.yaml)")
    save_folder(load_state_dict(args.input), load_config(args.config), args.output, overwrite=args.overwrite)
    folder = inspect_folder(args.output)
    return f"wrote the diffusers folder {args.output} ({folder.family}, {folder.parameterization} prediction) from {args.input}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("ldm.diffusers_format").setLevel(logging.INFO)  # the files read, what is filled or dropped
    try:
        print(convert(args))
    except (CheckpointError, OSError) as e:  # OSError: missing, unwritable, existing output, disk full
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
