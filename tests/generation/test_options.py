"""ldm/generation/options.py: flag names and defaults, bad values, image size, prompt files, VAE slicing."""

from __future__ import annotations

import argparse

import pytest
import torch

from ldm.generation import options
from ldm.generation.errors import GenerationError, UsageError
from ldm.generation.model import Geometry

ORIGINAL_TXT2IMG_DEFAULTS = {
    "outdir": "outputs/txt2img-samples", "steps": 50, "plms": False, "dpm": False, "fixed_code": False, "ddim_eta": 0.0,
    "n_iter": 3, "n_samples": 3, "n_rows": 0, "scale": 9.0, "from_file": None, "repeat": 1, "seed": 42,
    "precision": "autocast", "bf16": False,
}  # fmt: skip


def test_txt2img_flags_keep_the_original_names_and_defaults():
    args = options.build_parser("txt2img").parse_args([])
    for name, value in ORIGINAL_TXT2IMG_DEFAULTS.items():
        assert getattr(args, name) == value, name
    assert args.device == ("cuda" if torch.cuda.is_available() else "cpu")
    # --H/--W/--C/--f default to the model's own sizes (512, 512, 4, 8 for SD2 base).
    assert (args.H, args.W, args.C, args.f) == (None, None, None, None)
    assert (args.attention, args.compile, args.skip_first, args.time_file, args.vae_slice_size) == ("sdpa", False, False, None, None)


def test_img2img_flags_keep_the_original_defaults():
    args = options.build_parser("img2img").parse_args(["--init-img", "x.png", "--ddim_steps", "7"])
    assert (args.init_img, args.steps, args.strength, args.n_iter, args.n_samples) == ("x.png", 7, 0.8, 1, 2)
    assert args.outdir == "outputs/img2img-samples"
    assert not hasattr(args, "plms") and not hasattr(args, "H")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--n_samples", "0"], "must be at least 1"),
        (["--steps", "-1"], "must be at least 1"),
        (["--n_iter", "x"], "expected an integer"),
        (["--seed", str(2**32)], "below 2**32"),
        (["--plms", "--dpm"], "not allowed with"),
        (["--attention", "flash"], "invalid choice"),
    ],
)
def test_bad_flag_values_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        options.build_parser("txt2img").parse_args(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def _args(**kw) -> argparse.Namespace:
    """Parsed txt2img flags; ``name=True`` for a switch."""
    argv = [f"--{k}" if v is True else f"--{k}={v}" for k, v in kw.items()]
    return options.build_parser("txt2img").parse_args(["--device", "cpu", *argv])


def test_image_size_defaults_to_the_model_and_names_valid_sizes():
    sd2 = Geometry(channels=4, vae_factor=8, unet_factor=8, latent_size=64)
    assert options.image_size(_args(), sd2) == (512, 512)
    assert options.image_size(_args(H=768, W=640), sd2) == (768, 640)
    with pytest.raises(UsageError, match=r"--W 500: image sides must be multiples of 64 .* nearest: 448 or 512"):
        options.image_size(_args(W=500), sd2)
    with pytest.raises(UsageError, match="--f 16: this model's autoencoder downsamples by 8"):
        options.check_latent_flags(_args(f=16), sd2)
    with pytest.raises(UsageError, match="--C 8"):
        options.check_latent_flags(_args(C=8), sd2)


def test_read_prompts_batches_and_repeats(tmp_path):
    file = tmp_path / "prompts.txt"
    file.write_text("a\n\n  \nb\nc\n", encoding="utf-8")
    args = _args(n_samples=2, repeat=2, **{"from-file": file})
    assert options.read_prompts(args, "default") == [["a", "a"], ["b", "b"], ["c", "c"]]
    assert options.read_prompts(_args(n_samples=3), "default") == [["default"] * 3]
    file.write_text("\n \n")
    with pytest.raises(GenerationError, match="holds no prompts"):
        options.read_prompts(_args(**{"from-file": file}), "x")
    file.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(GenerationError, match="not UTF-8"):
        options.read_prompts(_args(**{"from-file": file}), "x")


def test_automatic_vae_slice_size():
    assert options.vae_slice_size(_args(), 512, 512) == 4
    assert options.vae_slice_size(_args(), 768, 768) == 1
    assert options.vae_slice_size(_args(), 64, 64) == 256
    assert options.vae_slice_size(_args(vae_slice_size=3), 64, 64) == 3
