"""Unit checks of ldm/generation.py: flags, sizes, files, grid, watermark, VAE slicing.
The scripts' end-to-end behaviour is tested in tests/scripts/."""

from __future__ import annotations

import argparse
import random

import numpy as np
import pytest
import torch

from ldm import generation as gen

ORIGINAL_TXT2IMG_DEFAULTS = {
    "outdir": "outputs/txt2img-samples", "steps": 50, "plms": False, "dpm": False, "fixed_code": False, "ddim_eta": 0.0,
    "n_iter": 3, "n_samples": 3, "n_rows": 0, "scale": 9.0, "from_file": None, "repeat": 1, "seed": 42,
    "precision": "autocast", "bf16": False,
}  # fmt: skip


def test_txt2img_flags_keep_the_original_names_and_defaults():
    args = gen.build_parser("txt2img").parse_args([])
    for name, value in ORIGINAL_TXT2IMG_DEFAULTS.items():
        assert getattr(args, name) == value, name
    assert args.device == ("cuda" if torch.cuda.is_available() else "cpu")
    # --H/--W/--C/--f default to the model's own sizes (512, 512, 4, 8 for SD2 base).
    assert (args.H, args.W, args.C, args.f) == (None, None, None, None)
    assert (args.attention, args.compile, args.skip_first, args.time_file, args.vae_slice_size) == ("sdpa", False, False, None, None)


def test_img2img_flags_keep_the_original_defaults():
    args = gen.build_parser("img2img").parse_args(["--init-img", "x.png", "--ddim_steps", "7"])
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
        gen.build_parser("txt2img").parse_args(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def _args(**kw) -> argparse.Namespace:
    """Parsed txt2img flags; ``name=True`` for a switch."""
    argv = [f"--{k}" if v is True else f"--{k}={v}" for k, v in kw.items()]
    return gen.build_parser("txt2img").parse_args(["--device", "cpu", *argv])


def test_image_size_defaults_to_the_model_and_names_valid_sizes():
    sd2 = gen.Geometry(channels=4, vae_factor=8, unet_factor=8, latent_size=64)
    assert gen.image_size(_args(), sd2) == (512, 512)
    assert gen.image_size(_args(H=768, W=640), sd2) == (768, 640)
    with pytest.raises(gen.UsageError, match=r"--W 500: image sides must be multiples of 64 .* nearest: 448 or 512"):
        gen.image_size(_args(W=500), sd2)
    with pytest.raises(gen.UsageError, match="--f 16: this model's autoencoder downsamples by 8"):
        gen.check_latent_flags(_args(f=16), sd2)
    with pytest.raises(gen.UsageError, match="--C 8"):
        gen.check_latent_flags(_args(C=8), sd2)


def test_model_geometry_reads_the_modules(tiny_files):
    config = gen.read_config(tiny_files["config"])
    g = gen.model_geometry(config, tiny_files["config"])
    assert (g.channels, g.vae_factor, g.unet_factor, g.latent_size, g.multiple) == (4, 8, 2, 8, 16)


def test_sd2_config_geometry():
    path = gen.REPO_ROOT / gen.SD2_CONFIG
    g = gen.model_geometry(gen.read_config(path), path)
    assert (g.channels, g.vae_factor, g.unet_factor, g.latent_size, g.multiple) == (4, 8, 8, 64, 64)


def test_model_files_demo_default_and_fallback(tiny_files, monkeypatch):
    monkeypatch.setattr(gen, "DEMO_CONFIG", tiny_files["config"])
    monkeypatch.setattr(gen, "DEMO_CKPT", tiny_files["safetensors"])
    assert gen.resolve_model_files(_args()) == gen.ModelFiles(tiny_files["config"], tiny_files["safetensors"], demo=True)
    # Either flag given: the original behaviour (v2-inference.yaml, --ckpt required).
    files = gen.resolve_model_files(_args(ckpt=tiny_files["ckpt"]))
    assert files.config.name == "v2-inference.yaml" and files.ckpt == tiny_files["ckpt"] and not files.demo
    with pytest.raises(gen.GenerationError, match="--ckpt is required"):
        gen.resolve_model_files(_args(config=tiny_files["config"]))
    assert gen.resolve_model_files(_args(config=tiny_files["config"], random_weights=True)).ckpt is None
    monkeypatch.setattr(gen, "DEMO_CKPT", tiny_files["config"].parent / "absent.safetensors")
    with pytest.raises(gen.GenerationError, match="--ckpt is required with .*v2-inference.yaml"):
        gen.resolve_model_files(_args())


def test_read_prompts_batches_and_repeats(tmp_path):
    file = tmp_path / "prompts.txt"
    file.write_text("a\n\n  \nb\nc\n", encoding="utf-8")
    args = _args(n_samples=2, repeat=2, **{"from-file": file})
    assert gen.read_prompts(args, "default") == [["a", "a"], ["b", "b"], ["c", "c"]]
    assert gen.read_prompts(_args(n_samples=3), "default") == [["default"] * 3]
    file.write_text("\n \n")
    with pytest.raises(gen.GenerationError, match="holds no prompts"):
        gen.read_prompts(_args(**{"from-file": file}), "x")
    file.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(gen.GenerationError, match="not UTF-8"):
        gen.read_prompts(_args(**{"from-file": file}), "x")


def test_init_image_is_cut_to_the_multiple_and_scaled(tmp_path):
    from PIL import Image

    path = tmp_path / "init.png"
    Image.fromarray(np.full((70, 90, 3), 255, np.uint8)).save(path)
    image = gen.load_init_image(str(path), 16)
    assert image.shape == (1, 3, 64, 80) and torch.allclose(image, torch.ones(()))
    with pytest.raises(gen.GenerationError, match="too small"):
        gen.load_init_image(str(path), 128)


def test_next_number_follows_what_is_there(tmp_path):
    assert gen.next_number(tmp_path, gen.SAMPLE_NAME) == 0
    for name in ("00003.png", "00010.png", "grid-0004.png", "notes.txt", ".00011.png.x.tmp"):
        (tmp_path / name).touch()
    assert gen.next_number(tmp_path, gen.SAMPLE_NAME) == 11
    assert gen.next_number(tmp_path, gen.GRID_NAME) == 5


@pytest.mark.parametrize("n, nrow", [(1, 3), (4, 2), (5, 3), (3, 8)])
def test_make_grid_matches_torchvision(n, nrow):
    utils = pytest.importorskip("torchvision.utils")
    images = torch.rand(n, 3, 8, 12)
    arrays = [gen.to_uint8(x) for x in images]
    expected = (255.0 * utils.make_grid(images, nrow=nrow).numpy().transpose(1, 2, 0)).astype(np.uint8)
    np.testing.assert_array_equal(gen.make_grid(arrays, nrow), expected)


def test_watermark_is_readable_and_small_images_are_left_alone(caplog):
    imwatermark = pytest.importorskip("imwatermark")
    marker = gen.Watermarker(enabled=True)
    image = (np.random.RandomState(0).rand(256, 256, 3) * 255).astype(np.uint8)
    marked = marker(image)
    assert marked.shape == image.shape and not np.array_equal(marked, image)
    decoder = imwatermark.WatermarkDecoder("bytes", 8 * len(gen.WATERMARK))
    assert decoder.decode(np.ascontiguousarray(marked[:, :, ::-1]), "dwtDct") == gen.WATERMARK.encode()
    small = image[:64, :64]
    assert marker(small) is small and "cannot carry the invisible watermark" in caplog.text
    assert gen.Watermarker(enabled=False)(image) is image


def test_vae_slices_decode_as_one_batch(tiny_eps_model):
    z = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        whole = gen.decode_latents(tiny_eps_model, z, 8)
        sliced = gen.decode_latents(tiny_eps_model, z, 2)
    assert whole.shape == (3, 3, 64, 64) and whole.min() >= 0 and whole.max() <= 1
    # Convolutions may pick other algorithms per batch size: equal to float rounding.
    torch.testing.assert_close(sliced, whole, rtol=0, atol=1e-5)


def test_automatic_vae_slice_size():
    assert gen.vae_slice_size(_args(), 512, 512) == 4
    assert gen.vae_slice_size(_args(), 768, 768) == 1
    assert gen.vae_slice_size(_args(), 64, 64) == 256
    assert gen.vae_slice_size(_args(vae_slice_size=3), 64, 64) == 3


def test_seed_everything_seeds_python_numpy_and_torch():
    draws = []
    for _ in range(2):
        gen.seed_everything(7)
        draws.append((random.random(), np.random.rand(), torch.rand(1).item()))
    assert draws[0] == draws[1]


def test_compile_probe_failure_is_explained(monkeypatch):
    def broken(fn, **kw):
        raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")

    monkeypatch.setattr(torch, "compile", broken)
    with pytest.raises(gen.GenerationError, match="torch.compile cannot compile for cpu here .*InvalidCxxCompiler.*run without --compile"):
        gen.check_compile(torch.device("cpu"))
