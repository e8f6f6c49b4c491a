"""scripts/img2img.py's work (``ldm.generation.main``, in-process) on the tiny SD2-structured model:
the init image's size handling, files, metadata, seeds, pixel equality with the original img2img
loop (DDIM stochastic_encode to int(strength * steps), then decode), and its bad inputs.
Flags shared with txt2img, and the scripts as programs, are tested in test_txt2img.py (same code,
ldm/generation/)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import assert_same_images, sample_images
from ldm.generation import main
from ldm.generation.images import load_init_image
from ldm.generation.tasks import TASKS
from ldm.generation.run import seed_everything
from ldm.loading import load_model_from_config
from ldm.models.diffusion.ddim import DDIMSampler

FAST = ["--steps", "4", "--strength", "0.5", "--n_samples", "2", "--n_iter", "1", "--precision", "full"]


def img2img(tiny_files, init: Path, outdir: Path, *flags: str) -> int:
    model = ["--config", str(tiny_files["config"]), "--ckpt", str(tiny_files["safetensors"])]
    return main([*model, "--init-img", str(init), "--outdir", str(outdir), *FAST, *flags], "img2img")


@pytest.fixture(scope="module")
def runs(tiny_files, tmp_path_factory) -> dict[str, Path]:
    """An 80x70 init image (cut to 80x64: the tiny model needs multiples of 16) and three runs of
    two iterations: with --skip_first and a time file, plain, and with --fixed_code."""
    root = tmp_path_factory.mktemp("img2img")
    init = root / "init.png"
    Image.fromarray((np.random.RandomState(0).rand(70, 80, 3) * 255).astype(np.uint8)).save(init)
    assert img2img(tiny_files, init, root / "timed", "--n_iter", "2", "--skip_first", "--time_file", str(root / "time.txt")) == 0
    assert img2img(tiny_files, init, root / "plain", "--n_iter", "2") == 0
    assert img2img(tiny_files, init, root / "fixed", "--n_iter", "2", "--fixed_code") == 0
    return {"root": root, "init": init, "timed": root / "timed", "plain": root / "plain", "fixed": root / "fixed"}


def test_files_sizes_and_metadata(runs):
    timed = runs["timed"]
    assert [p.name for p in sorted((timed / "samples").iterdir())] == [f"{i:05}.png" for i in range(4)]
    assert [p.name for p in timed.glob("grid-*.png")] == ["grid-0000.png"]
    assert float((runs["root"] / "time.txt").read_text()) > 0
    with Image.open(timed / "samples" / "00003.png") as image:
        assert image.size == (80, 64)
        text = dict(image.text)
    expected = {"prompt": TASKS["img2img"].default_prompt, "negative_prompt": "", "init_image": "init.png", "strength": "0.5",
                "sampler": "ddim", "steps": "4", "seed": "42", "size": "80x64", "iteration": "1", "batch_index": "1"}  # fmt: skip
    assert {k: text[k] for k in expected} == expected


def test_same_seed_same_pixels_with_and_without_warm_up_and_fixed_code(runs):
    timed, plain, fixed = (sample_images(runs[k]) for k in ("timed", "plain", "fixed"))
    for a, b in zip(timed, plain, strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(plain[0], plain[2])  # iterations draw new encoding noise...
    np.testing.assert_array_equal(fixed[0], fixed[2])  # ...unless --fixed_code
    np.testing.assert_array_equal(fixed[1], fixed[3])
    np.testing.assert_array_equal(fixed[0], plain[0])


def test_pixels_match_the_original_img2img_loop(runs, tiny_files):
    """The original img2img's steps: encode the init image repeated to the batch, sample its
    posterior, then per iteration stochastic_encode to t_enc and DDIM-decode, with guidance."""
    model = load_model_from_config(tiny_files["config"], tiny_files["safetensors"], "cpu")
    sampler = DDIMSampler(model, device=torch.device("cpu"))
    seed_everything(42)
    expected = []
    with torch.no_grad(), model.ema_scope():
        init = load_init_image(str(runs["init"]), 16).repeat(2, 1, 1, 1)
        init_latent = model.get_first_stage_encoding(model.encode_first_stage(init))
        sampler.make_schedule(ddim_num_steps=4, ddim_eta=0.0, verbose=False)
        t_enc = int(0.5 * 4)
        for _ in range(2):
            uc = model.get_learned_conditioning(2 * [""])
            c = model.get_learned_conditioning(2 * [TASKS["img2img"].default_prompt])
            z_enc = sampler.stochastic_encode(init_latent, torch.tensor([t_enc] * 2))
            z = sampler.decode(z_enc, c, t_enc, unconditional_guidance_scale=9.0, unconditional_conditioning=uc)
            x = torch.clamp((model.decode_first_stage(z) + 1.0) / 2.0, min=0.0, max=1.0)
            expected += [(255.0 * s.cpu().numpy().transpose(1, 2, 0)).astype(np.uint8) for s in x]
    # The script encodes the image once for the batch (the original encodes b equal copies):
    # the same latents up to float rounding, so a pixel may differ by one level.
    assert_same_images(sample_images(runs["plain"]), expected)


def test_full_strength_noises_to_the_last_step(tiny_files, runs, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="ldm")
    assert img2img(tiny_files, runs["init"], tmp_path, "--strength", "1.0", "--n_samples", "1") == 0
    assert "noised by 3 of 4 steps" in caplog.text
    assert len(sample_images(tmp_path)) == 1


BAD_INPUTS = {
    "missing": (["--init-img", "{tmp}/absent.png"], 1, "--init-img {tmp}/absent.png: no such file"),
    "unreadable": (["--init-img", "{text}"], 1, "cannot be read as an image"),
    "too_small": (["--init-img", "{small}"], 1, "8x8 is too small, sides must be at least 16 pixels"),
    "strength": (["--strength", "1.5"], 2, "argument --strength: must be in [0.0, 1.0], got 1.5"),
    "no_plms": (["--plms"], 2, "unrecognized arguments: --plms"),
    "steps": (["--ddim_steps", "0"], 2, "must be at least 1, got 0"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_explained_and_writes_nothing(tiny_files, tmp_path, capsys, case):
    files = {"tmp": tmp_path, "text": tmp_path / "notes.png", "small": tmp_path / "small.png"}
    files["text"].write_text("not an image")
    Image.new("RGB", (8, 8)).save(files["small"])
    flags, status, message = BAD_INPUTS[case]
    out = tmp_path / "run"
    assert img2img(tiny_files, tmp_path / "x.png", out, *(f.format(**files) for f in flags)) == status
    err = capsys.readouterr().err
    assert "img2img.py: error: " in err and message.format(**files) in err, err
    assert not out.exists()


@pytest.mark.parametrize("sampler", ["ddim", "euler"])
def test_a_strength_that_denoises_no_step_is_refused(tiny_files, runs, tmp_path, capsys, sampler):
    assert img2img(tiny_files, runs["init"], tmp_path / "run", "--strength", "0.2", "--sampler", sampler) == 2
    title = {"ddim": "DDIM", "euler": "Euler"}[sampler]
    assert f"--strength 0.2 of --steps 4 denoises no step with {title} (steps x strength must be at least 1)" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_run_reports_the_resize_and_its_files_relative_to_the_working_folder(tiny_files, runs, tmp_path, monkeypatch,
                                                                              capsys, caplog):
    monkeypatch.chdir(tmp_path)
    caplog.set_level(logging.INFO, logger="ldm")
    argv = ["--config", str(tiny_files["config"]), "--ckpt", str(tiny_files["ckpt"]), "--init-img", str(runs["init"]), *FAST,
            "--outdir", "out"]  # fmt: skip
    assert main(argv, "img2img") == 0
    assert "init image 80x70 resized to 80x64" in caplog.text
    assert "2 images in out/samples (00000.png to 00001.png), grid out/grid-0000.png;" in capsys.readouterr().out
    np.testing.assert_array_equal(sample_images(tmp_path / "out")[0], sample_images(runs["plain"])[0])  # the .ckpt file: the same weights
