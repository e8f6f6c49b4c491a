"""scripts/txt2img.py as a user runs it, on the tiny SD2-structured model and its random
checkpoint: files and numbering, timing files, metadata, seeds, every sampler and backend
flag, the demo default, pixel equality with the original script's loop, and every bad input.

Most runs call ``ldm.generation.main`` in-process (the script is only its entry point);
a few true subprocess runs check the exit status, the log lines and the absence of tracebacks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from conftest import ROOT, assert_same_images, child_env, pixels, samples
from ldm.generation import main
from ldm.generation import model as generation_model
from ldm.generation.options import DEMO_PROMPT
from ldm.generation.tasks import TASKS
from ldm.generation.run import seed_everything
from ldm.loading import load_model_from_config
from ldm.models.diffusion.ddim import DDIMSampler

SCRIPT = ROOT / "scripts" / "txt2img.py"
FAST = ["--H", "64", "--W", "64", "--steps", "2", "--n_samples", "1", "--n_iter", "1", "--precision", "full"]


def txt2img(tiny_files, outdir: Path, *flags: str) -> int:
    model = ["--config", str(tiny_files["config"]), "--ckpt", str(tiny_files["safetensors"])]
    return main([*model, "--outdir", str(outdir), *FAST, *flags], "txt2img")


@pytest.fixture(scope="module")
def runs(tiny_files, tmp_path_factory) -> dict[str, Path]:
    """Three runs of two iterations with seed 42: with --skip_first and the timing files (into a
    folder already holding a foreign 00007.png), plain, and with --fixed_code."""
    root = tmp_path_factory.mktemp("txt2img")
    (root / "timed" / "samples").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(root / "timed" / "samples" / "00007.png")
    timed = ["--skip_first", "--time_file", str(root / "time.txt"), "--stats_file", str(root / "stats.json")]
    assert txt2img(tiny_files, root / "timed", "--n_iter", "2", *timed) == 0
    assert txt2img(tiny_files, root / "plain", "--n_iter", "2") == 0
    assert txt2img(tiny_files, root / "fixed", "--n_iter", "2", "--fixed_code") == 0
    return {"root": root, "timed": root / "timed", "plain": root / "plain", "fixed": root / "fixed"}


def test_files_are_numbered_after_what_is_there_and_warm_up_is_not_saved(runs, tiny_files):
    timed = runs["timed"]
    assert [p.name for p in samples(timed)] == ["00007.png", "00008.png", "00009.png"]
    assert [p.name for p in timed.glob("grid-*.png")] == ["grid-0000.png"]
    assert pixels(timed / "samples" / "00008.png").shape == (64, 64, 3)
    # A second run continues the numbering and overwrites nothing.
    before = {p: p.read_bytes() for p in timed.rglob("*.png")}
    assert txt2img(tiny_files, timed) == 0
    assert [p.name for p in samples(timed)][-1] == "00010.png"
    assert sorted(p.name for p in timed.glob("grid-*.png")) == ["grid-0000.png", "grid-0001.png"]
    assert all(p.read_bytes() == data for p, data in before.items())
    assert not list(timed.rglob("*.tmp"))


def test_time_and_stats_files(runs):
    seconds = float((runs["root"] / "time.txt").read_text())
    stats = json.loads((runs["root"] / "stats.json").read_text())
    assert seconds > 0 and stats["seconds"] == pytest.approx(seconds, abs=1e-5)
    assert stats["images"] == 2 and stats["seconds_per_image"] == pytest.approx(seconds / 2, abs=1e-5)
    expected = {"peak_gpu_memory_bytes": None, "device": "cpu", "torch": torch.__version__, "sampler": "ddim", "steps": 2,
                "H": 64, "W": 64, "n_samples": 1, "n_iter": 2, "attention": "sdpa", "compile": False}  # fmt: skip
    assert {k: stats[k] for k in expected} == expected


def test_png_metadata_describes_the_image(runs, tiny_files):
    with Image.open(runs["timed"] / "samples" / "00009.png") as image:
        text = dict(image.text)
    assert text["prompt"] == TASKS["txt2img"].default_prompt and text["negative_prompt"] == ""
    expected = {"seed": "42", "sampler": "ddim", "steps": "2", "scale": "9.0", "size": "64x64", "eta": "0.0",
                "iteration": "1", "batch_index": "0", "config": tiny_files["config"].name,
                "checkpoint": tiny_files["safetensors"].name}  # fmt: skip
    assert {k: text[k] for k in expected} == expected
    with Image.open(runs["timed"] / "grid-0000.png") as grid:
        assert grid.text["prompt"] == TASKS["txt2img"].default_prompt
        assert grid.size == (66 + 2, 2 * 66 + 2)  # n_rows = n_samples = 1: one column of two, padding 2


def test_same_seed_same_pixels_with_and_without_warm_up_and_fixed_code(runs):
    timed, plain, fixed = (list(map(pixels, samples(runs[k]))) for k in ("timed", "plain", "fixed"))
    timed = timed[1:]  # the foreign 00007.png
    for a, b in zip(timed, plain):
        np.testing.assert_array_equal(a, b)  # --skip_first changes nothing saved
    assert not np.array_equal(plain[0], plain[1])  # a new starting noise per iteration...
    np.testing.assert_array_equal(fixed[0], fixed[1])  # ...unless --fixed_code
    np.testing.assert_array_equal(fixed[0], plain[0])  # drawn at the same place of the seed's stream


def test_pixels_match_the_original_scripts_loop(runs, tiny_files):
    """The original txt2img's steps, spelled out: seed, DDIM sampling with guidance, decoding,
    clamping, and the 255 * x truncation to uint8."""
    model = load_model_from_config(tiny_files["config"], tiny_files["safetensors"], "cpu")
    sampler = DDIMSampler(model, device=torch.device("cpu"))
    seed_everything(42)
    expected = []
    with torch.no_grad(), model.ema_scope():
        for _ in range(2):
            uc = model.get_learned_conditioning([""])
            c = model.get_learned_conditioning([TASKS["txt2img"].default_prompt])
            z, _ = sampler.sample(S=2, conditioning=c, batch_size=1, shape=[4, 8, 8], verbose=False,
                                  unconditional_guidance_scale=9.0, unconditional_conditioning=uc, eta=0.0, x_T=None)
            x = torch.clamp((model.decode_first_stage(z) + 1.0) / 2.0, min=0.0, max=1.0)
            expected += [(255.0 * s.cpu().numpy().transpose(1, 2, 0)).astype(np.uint8) for s in x]
    for path, want in zip(samples(runs["plain"]), expected):  # this package's code on both sides: bit for bit
        np.testing.assert_array_equal(pixels(path), want)


@pytest.mark.parametrize(
    "flags, sampler, same_as",
    [
        (["--plms", "--disable_flash"], "plms", ["--plms"]),
        (["--dpm", "--disable_math"], "dpm", ["--dpm"]),
        (["--attention", "vanilla", "--disable_mem_efficient", "--ddim_eta", "0.5"], "ddim", ["--ddim_eta", "0.5"]),
        (["--attention", "sdpa", "--precision", "autocast", "--no_watermark", "--vae_slice_size", "1", "--n_samples", "2"], "ddim", None),
    ],
)
def test_samplers_and_backend_flags_run(tiny_files, tmp_path, flags, sampler, same_as):
    """Each sampler flag picks its sampler; the attention flags change float rounding, not the image."""
    assert txt2img(tiny_files, tmp_path / "run", *flags) == 0
    written = samples(tmp_path / "run")
    assert len(written) == (2 if "--n_samples" in flags else 1)
    with Image.open(written[0]) as image:
        assert image.text["sampler"] == sampler
        assert image.getextrema() != ((0, 0), (0, 0), (0, 0))
    if same_as is not None:
        assert txt2img(tiny_files, tmp_path / "reference", *same_as) == 0
        assert_same_images(list(map(pixels, written)), list(map(pixels, samples(tmp_path / "reference"))))


@pytest.mark.parametrize("flags, recorded", [
    (["--sampler", "DPM++ 2M Karras"], {"sampler": "dpmpp_2m", "schedule": "karras"}),
    (["--sampler", "Euler a", "--schedule", "trailing"], {"sampler": "euler_ancestral", "schedule": "trailing", "eta": "1.0"}),
    (["--sampler", "dpmpp_2m_sde", "--eta", "0.5", "--scale", "1"], {"sampler": "dpmpp_2m_sde", "schedule": "exponential", "eta": "0.5"}),
    (["--plms"], {"sampler": "plms", "schedule": "uniform"}),
])  # fmt: skip
def test_png_metadata_records_sampler_schedule_and_eta(tiny_files, tmp_path, flags, recorded):
    assert txt2img(tiny_files, tmp_path, *flags, "--stats_file", str(tmp_path / "stats.json")) == 0
    with Image.open(samples(tmp_path)[0]) as image:
        assert {key: image.text.get(key) for key in recorded} == recorded
        assert ("eta" in image.text) == ("eta" in recorded)
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["sampler"] == recorded["sampler"] and stats["schedule"] == recorded["schedule"]
    assert stats["unet_calls_per_batch"] == (3 if recorded["sampler"] == "plms" else 2)  # --steps 2


def test_the_same_image_from_the_a1111_spelling_and_the_names(tiny_files, tmp_path):
    assert txt2img(tiny_files, tmp_path / "a", "--sampler", "DPM++ 2M Karras") == 0
    assert txt2img(tiny_files, tmp_path / "b", "--sampler", "dpmpp_2m", "--schedule", "karras") == 0
    np.testing.assert_array_equal(pixels(samples(tmp_path / "a")[0]), pixels(samples(tmp_path / "b")[0]))


def test_prompts_from_file_in_batches_with_grid_rows(tiny_files, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\na blue square\na green triangle\n")
    out = tmp_path / "out"
    assert txt2img(tiny_files, out, "--from-file", str(prompts), "--n_samples", "2", "--n_rows", "3") == 0
    names = [Image.open(p).text["prompt"] for p in samples(out)]
    assert names == ["a red circle", "a blue square", "a green triangle"]
    with Image.open(out / "grid-0000.png") as grid:
        assert grid.size == (3 * 66 + 2, 66 + 2)


def test_random_weights_warns_and_runs(tiny_files, tmp_path, caplog):
    argv = ["--config", str(tiny_files["config"]), "--random_weights", "--outdir", str(tmp_path), *FAST]
    assert main(argv, "txt2img") == 0
    assert "images are noise" in caplog.text
    with Image.open(samples(tmp_path)[0]) as image:
        assert image.text["checkpoint"] == "random weights"


def test_demo_model_is_the_default_when_installed(tiny_files, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(generation_model, "DEMO_CONFIG", tiny_files["config"])
    monkeypatch.setattr(generation_model, "DEMO_CKPT", tiny_files["safetensors"])
    assert main(["--outdir", str(tmp_path), "--steps", "2", "--n_samples", "1", "--n_iter", "1", "--precision", "full"]) == 0
    out = capsys.readouterr().out
    assert "Using the demo model" in out and "--config configs/stable-diffusion/v2-inference.yaml --ckpt" in out
    with Image.open(samples(tmp_path)[0]) as image:
        assert image.size == (64, 64)  # the model's native size: latent 8 x autoencoder factor 8
        assert image.text["prompt"] == DEMO_PROMPT


def test_too_long_prompt_is_encoded_in_chunks_not_truncated(tiny_files, tmp_path, caplog):
    """120 tokens: two 75-token chunks, as AUTOMATIC1111 (the original dropped the last 45)."""
    with caplog.at_level("INFO", logger="ldm"):
        assert txt2img(tiny_files, tmp_path, "--prompt", "a red circle " * 40) == 0
    assert "encoded in 2 chunks" in caplog.text and "were dropped" not in caplog.text


def _config_variant(tiny_files, tmp_path: Path, native_mha: bool = False, text: str | None = None) -> str:
    path = tmp_path / ("native.yaml" if native_mha else "variant.yaml")
    if text is not None:
        path.write_text(text)
    else:
        config = OmegaConf.load(tiny_files["config"])
        config.model.params.unet_config.params.use_native_mha = native_mha
        OmegaConf.save(config, path)
    return str(path)


BAD_INPUTS = {
    "size": (["--H", "72"], 2, "--H 72: image sides must be multiples of 16 for this model"),
    "n_samples": (["--n_samples", "0"], 2, "argument --n_samples: must be at least 1, got 0"),
    "steps": (["--steps", "0"], 2, "argument --steps: must be at least 1, got 0"),
    "n_iter": (["--n_iter", "-2"], 2, "argument --n_iter: must be at least 1, got -2"),
    "f": (["--f", "4"], 2, "--f 4: this model's autoencoder downsamples by 8"),
    "all_backends": (["--disable_flash", "--disable_mem_efficient", "--disable_math"], 2, "leave SDPA no backend"),
    "cpu_backends": (["--disable_flash", "--disable_math"], 2, "on the CPU, SDPA has only the flash and math backends"),
    "plms_eta": (["--plms", "--ddim_eta", "0.5"], 2, "PLMS takes no eta"),
    "steps_schedule": (["--steps", "3"], 2, "--steps 3: "),  # 1000 // 3 spaced steps end past timestep 999
    "ckpt_missing": (["--ckpt", "{tmp}/absent.ckpt"], 1, "absent.ckpt: no such file"),
    "ckpt_corrupt": (["--ckpt", "{corrupt}"], 1, "is not a readable safetensors file"),
    "config_missing": (["--config", "{tmp}/absent.yaml"], 1, "--config {tmp}/absent.yaml: no such file"),
    "config_yaml": (["--config", "{bad_yaml}"], 1, "cannot be read as YAML"),
    "config_not_ldm": (["--config", "{not_ldm}"], 1, "not a latent-diffusion config"),
    "mismatch": (["--config", "{native}"], 1, "checkpoint does not match the model"),
    "from_file_missing": (["--from-file", "{tmp}/absent.txt"], 1, "--from-file {tmp}/absent.txt: no such file"),
    "from_file_empty": (["--from-file", "{empty}"], 1, "holds no prompts"),
    "outdir_under_file": (["--outdir", "{empty}/out"], 1, "is not a folder"),
    "time_file_folder": (["--time_file", "{tmp}/absent/time.txt"], 1, "--time_file {tmp}/absent/time.txt: folder"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_explained_and_writes_nothing(tiny_files, tmp_path, capsys, case):
    files = {
        "tmp": tmp_path,
        "corrupt": tmp_path / "corrupt.safetensors",
        "bad_yaml": _config_variant(tiny_files, tmp_path, text="model: [unclosed\n"),
        "not_ldm": tmp_path / "not_ldm.yaml",
        "native": _config_variant(tiny_files, tmp_path, native_mha=True),
        "empty": tmp_path / "empty.txt",
    }
    files["corrupt"].write_bytes(b"not a checkpoint")
    files["not_ldm"].write_text("model:\n  target: torch.nn.Identity\n")
    files["empty"].write_text("\n  \n")
    flags, status, message = BAD_INPUTS[case]
    flags = [f.format(**files) for f in flags]
    out = tmp_path / "run"
    assert txt2img(tiny_files, out, *flags) == status
    err = capsys.readouterr().err
    assert "txt2img.py: error: " in err and message.format(**files) in err, err
    assert not out.exists() and "Traceback" not in err


def test_mismatch_shows_the_checkpoint_diagnosis(tiny_files, tmp_path, capsys):
    assert txt2img(tiny_files, tmp_path / "run", "--config", _config_variant(tiny_files, tmp_path, native_mha=True)) == 1
    assert "convert it with `python tools/convert_native_mha.py IN OUT`" in capsys.readouterr().err


def test_unwritable_outdir(tiny_files, tmp_path, capsys, monkeypatch):
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: access(path, mode) and Path(path) != tmp_path)
    assert txt2img(tiny_files, tmp_path / "run") == 1
    assert f"--outdir {tmp_path / 'run'}: {tmp_path} is not writable" in capsys.readouterr().err


def test_compile_unavailable_fails_before_loading(tiny_files, tmp_path, capsys, monkeypatch):
    def no_compiler(*args, **kwargs):
        raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")

    monkeypatch.setattr(torch, "compile", no_compiler)
    assert txt2img(tiny_files, tmp_path / "run", "--compile") == 1
    assert "--compile: torch.compile cannot compile for cpu here" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_requested_without_cuda(tiny_files, tmp_path, capsys):
    assert txt2img(tiny_files, tmp_path, "--device", "cuda") == 2
    assert "no CUDA device is available" in capsys.readouterr().err


# -- as a user runs it -------------------------------------------------------------------
def run_script(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=cwd, capture_output=True, text=True, timeout=300, env=child_env())


def test_cli_run_with_autocast_and_a_too_long_prompt(tiny_files, tmp_path):
    result = run_script("--config", str(tiny_files["config"]), "--ckpt", str(tiny_files["ckpt"]), "--steps", "2",
                        "--n_samples", "2", "--n_iter", "1", "--prompt", "a red circle " * 40, "--outdir", "out",
                        "--time_file", "time.txt", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("encoded in 2 chunks") == 1 and "were dropped" not in result.stderr
    assert "Traceback" not in result.stderr
    assert "2 images in out/samples (00000.png to 00001.png), grid out/grid-0000.png;" in result.stdout
    assert "s/image" in result.stdout and "it/s" in result.stdout
    assert len(samples(tmp_path / "out")) == 2 and float((tmp_path / "time.txt").read_text()) > 0


def test_cli_bad_input_exit_status(tmp_path):
    result = run_script("--config", str(tmp_path / "absent.yaml"), "--ckpt", "x.ckpt", cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == f"txt2img.py: error: --config {tmp_path / 'absent.yaml'}: no such file"


@pytest.mark.slow
def test_cli_compile_run_on_cpu(tiny_files, tmp_path):
    """The one real torch.compile run (slow on the CPU: inductor compiles C++ kernels)."""
    result = run_script("--config", str(tiny_files["config"]), "--ckpt", str(tiny_files["safetensors"]), *FAST,
                        "--compile", "--skip_first", "--outdir", "out", "--time_file", "time.txt",
                        "--stats_file", "stats.json", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert [p.name for p in samples(tmp_path / "out")] == ["00000.png"]  # the warm-up was not saved
    assert float((tmp_path / "time.txt").read_text()) > 0
    assert json.loads((tmp_path / "stats.json").read_text())["compile"] == "default"
