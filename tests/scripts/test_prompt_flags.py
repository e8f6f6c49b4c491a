"""The prompt flags of every script (--negative_prompt, --prompt_syntax, --embedding,
--embeddings_dir) on the tiny model: the images are the pipeline's for the same settings, the PNG
records them, and bad input is one error line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import samples
from ldm.generation import main
from ldm.generation.images import to_uint8
from ldm.generation.model import Model
from ldm.generation.options import build_parser
from ldm.generation.run import render
from ldm.generation.settings import ModelSettings, SamplingSettings
from ldm.generation.tasks import TASKS, Txt2ImgPipeline

FAST = ["--H", "64", "--W", "64", "--steps", "2", "--n_samples", "1", "--n_iter", "1", "--precision", "full", "--device", "cpu"]


def txt2img(tiny_files, outdir: Path, *flags: str) -> int:
    model = ["--config", str(tiny_files["config"]), "--ckpt", str(tiny_files["safetensors"])]
    return main([*model, "--outdir", str(outdir), *FAST, *flags], "txt2img")


def sample(outdir: Path) -> tuple[np.ndarray, dict[str, str]]:
    (path,) = samples(outdir)
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")), dict(image.text)


def pipeline_pixels(tiny_files, prompt: str, **settings) -> np.ndarray:
    """The image Txt2ImgPipeline renders for the script's settings (seed 42, DDIM, 2 steps)."""
    sampling = {k: settings.pop(k) for k in ("negative_prompt",) if k in settings}
    model = Model(ModelSettings(config=tiny_files["config"], ckpt=tiny_files["safetensors"], device="cpu", precision="full", **settings))
    images = render(Txt2ImgPipeline(model, SamplingSettings(steps=2, **sampling), height=64, width=64), [prompt])
    return to_uint8(images[0])


REQUIRED = {"img2img": ["--init-img", "x.png"], "inpaint": ["--image", "x.png", "--mask", "m.png"]}


@pytest.mark.parametrize("task", list(TASKS))
def test_every_script_has_the_prompt_flags(task):
    required = REQUIRED.get(task, [] if task == "txt2img" else ["--image", "x.png"])
    args = build_parser(task).parse_args([*required, "--negative_prompt", "blurry", "--prompt_syntax", "none", "--embedding",
                                          "a.pt", "--embedding", "b.safetensors", "--embeddings_dir", "emb"])
    assert args.negative_prompt == "blurry" and args.prompt_syntax == "none"
    assert args.embeddings == ["a.pt", "b.safetensors"] and args.embeddings_dir == "emb"
    defaults = build_parser(task).parse_args(required)
    assert defaults.negative_prompt == "" and defaults.prompt_syntax == "a1111" and defaults.embeddings == []


def test_help_explains_the_syntax_the_negative_prompt_and_embeddings(capsys):
    assert main(["--help"], "txt2img") == 0
    text = " ".join(capsys.readouterr().out.split())
    for phrase in ("(word:1.3)", "BREAK", "--negative_prompt", "unconditional text", "--prompt_syntax {a1111,none}",
                   "--embedding FILE", "--embeddings_dir DIR", "file's stem", "docs/adapters.md"):
        assert phrase in text, phrase


def test_negative_prompt_is_used_and_recorded(tiny_files, tmp_path):
    negative = "a (green:1.2) square"
    assert txt2img(tiny_files, tmp_path / "neg", "--prompt", "a red circle", "--negative_prompt", negative) == 0
    assert txt2img(tiny_files, tmp_path / "plain", "--prompt", "a red circle") == 0
    (pixels, text), (plain, plain_text) = sample(tmp_path / "neg"), sample(tmp_path / "plain")
    assert text["negative_prompt"] == negative and plain_text["negative_prompt"] == ""
    np.testing.assert_array_equal(pixels, pipeline_pixels(tiny_files, "a red circle", negative_prompt=negative))
    assert not np.array_equal(pixels, plain)


def test_negative_prompt_without_guidance_warns(tiny_files, tmp_path, caplog):
    assert txt2img(tiny_files, tmp_path, "--scale", "1", "--negative_prompt", "blurry") == 0
    assert "--negative_prompt has no effect at --scale 1" in caplog.text


def test_prompt_syntax_none_takes_brackets_literally(tiny_files, tmp_path):
    prompt = "a (red:1.5) circle"
    assert txt2img(tiny_files, tmp_path / "none", "--prompt", prompt, "--prompt_syntax", "none") == 0
    assert txt2img(tiny_files, tmp_path / "a1111", "--prompt", prompt) == 0
    (literal, text), (weighted, weighted_text) = sample(tmp_path / "none"), sample(tmp_path / "a1111")
    assert text["prompt_syntax"] == "none" and weighted_text["prompt_syntax"] == "a1111"
    np.testing.assert_array_equal(literal, pipeline_pixels(tiny_files, prompt, prompt_syntax="none"))
    np.testing.assert_array_equal(weighted, pipeline_pixels(tiny_files, prompt))
    assert not np.array_equal(literal, weighted)


def test_embedding_files_and_folders(tiny_files, tmp_path):
    folder = tmp_path / "embeddings"
    folder.mkdir()
    torch.save(torch.randn(2, 48, generator=torch.Generator().manual_seed(0)), folder / "mystyle.pt")
    torch.save({"string_to_param": {"*": torch.randn(1, 48)}}, tmp_path / "shiny.pt")
    prompt = "a red circle in mystyle, shiny"
    assert txt2img(tiny_files, tmp_path / "out", "--prompt", prompt, "--embeddings_dir", str(folder), "--embedding",
                   str(tmp_path / "shiny.pt")) == 0
    pixels, text = sample(tmp_path / "out")
    assert text["embeddings"] == "shiny, mystyle"
    expected = pipeline_pixels(tiny_files, prompt, embeddings=[tmp_path / "shiny.pt"], embeddings_dir=folder)
    np.testing.assert_array_equal(pixels, expected)
    assert not np.array_equal(pixels, pipeline_pixels(tiny_files, prompt))


def last_error(capsys) -> str:
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_an_sd1_embedding_is_one_error_line(tiny_files, tmp_path, capsys):
    torch.save({"string_to_param": {"*": torch.randn(1, 768)}}, tmp_path / "sd1.pt")
    assert txt2img(tiny_files, tmp_path / "out", "--embedding", str(tmp_path / "sd1.pt")) == 1
    assert last_error(capsys) == (f"txt2img.py: error: textual inversion: {tmp_path / 'sd1.pt'}: an embedding for SD1.x "
                                  "(CLIP ViT-L/14, 768-wide); this model's text encoder is 48-wide")
    assert not (tmp_path / "out").exists()


def test_a_bad_weight_is_a_usage_error(tiny_files, tmp_path, capsys):
    assert txt2img(tiny_files, tmp_path / "out", "--negative_prompt", "(blurry:1.2.3)") == 2
    assert "'1.2.3' in ':1.2.3)' is not a number" in last_error(capsys)
    assert not (tmp_path / "out").exists()
