"""LoRAs in a run (--lora FILE[:WEIGHT], <lora:NAME:WEIGHT> with --lora_dir): the images of the
merged model, the tags taken out of the text, switching between batches restoring the base weights
bit for bit, and bad inputs explained. The merge itself is checked against diffusers in
tests/test_lora.py.

Both sides run the same operations in the same order on the same CPU: pixels agree to one uint8 level.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import pixels, random_kohya, samples, tiny_model
from ldm.checkpoint import save_state_dict
from ldm.generation import main
from ldm.generation.errors import UsageError
from ldm.generation.model import Model
from ldm.generation.settings import ModelSettings, SamplingSettings
from ldm.generation.tasks import Txt2ImgPipeline
from ldm.lora import LoraError, prompt_loras

FAST = ["--H", "64", "--W", "64", "--steps", "4", "--n_samples", "1", "--n_iter", "1", "--precision", "full", "--seed", "5",
        "--no_watermark"]


@pytest.fixture(scope="module")
def files(tiny_files, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("loras")
    (root / "loras").mkdir()
    save_state_dict(random_kohya(tiny_model("eps"), 11, alpha=4.0), root / "loras" / "style.safetensors")
    return {**tiny_files, "lora": root / "loras" / "style.safetensors", "lora_dir": root / "loras"}


def run(files, outdir: Path, *flags: str) -> np.ndarray:
    argv = ["--config", str(files["config"]), "--ckpt", str(files["safetensors"]), "--outdir", str(outdir), *FAST, *flags]
    assert main(argv, "txt2img") == 0
    [path] = samples(outdir)
    return pixels(path)


def test_prompt_tags_are_taken_out():
    assert prompt_loras("a cat <lora:style:0.7>, <lora:ink> on a mat") == ("a cat ,  on a mat", [("style", 0.7), ("ink", 1.0)])  # removed as A1111 removes them
    assert prompt_loras("no tags (at all:1.2)") == ("no tags (at all:1.2)", [])
    with pytest.raises(LoraError, match="must be a number"):
        prompt_loras("<lora:style:lots>")


def test_a_lora_flag_and_a_prompt_tag_give_the_merged_models_image(files, tmp_path):
    flag = run(files, tmp_path / "flag", "--prompt", "a red box", "--lora", f"{files['lora']}:0.7")
    tag = run(files, tmp_path / "tag", "--prompt", "a red box<lora:style:0.7>", "--lora_dir", str(files["lora_dir"]))
    plain = run(files, tmp_path / "plain", "--prompt", "a red box")
    assert np.abs(flag.astype(int) - tag.astype(int)).max() <= 1
    assert np.abs(flag.astype(int) - plain.astype(int)).max() > 10
    with Image.open(samples(tmp_path / "flag")[0]) as png:
        assert png.text["lora"] == "style.safetensors:0.7"


def test_switching_loras_between_batches_restores_the_base_weights(files):
    model = Model(ModelSettings(config=files["config"], ckpt=files["safetensors"], device="cpu", precision="full",
                                lora_dir=files["lora_dir"]))
    pipe = Txt2ImgPipeline(model, SamplingSettings(steps=4, seed=5), height=64, width=64)
    net = model.load()
    base = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        torch.manual_seed(0)
        plain = pipe(["a box"])
        torch.manual_seed(0)
        styled = pipe(["a box <lora:style:1>"])
        changed = any(not torch.equal(v, base[k]) for k, v in net.state_dict().items())
        torch.manual_seed(0)
        again = pipe(["a box"])
    assert changed and not torch.equal(plain, styled)
    assert torch.equal(plain, again) and all(torch.equal(v, base[k]) for k, v in net.state_dict().items())
    with pytest.raises(UsageError, match="two weights in one batch"):
        pipe(["a box <lora:style:1>", "a box <lora:style:0.5>"])


@pytest.mark.parametrize("case, message", [
    ("tag without dir", "needs --lora_dir"),
    ("unknown name", "no such LoRA in"),
    ("missing file", "--lora .*: no such file"),
    ("sd15", "a LoRA for SD 1.x"),
])
def test_bad_loras_are_explained_and_write_nothing(files, tmp_path, capsys, case, message):
    if case == "tag without dir":
        flags = ["--prompt", "x <lora:style>"]
    elif case == "unknown name":
        flags = ["--prompt", "x <lora:nothing>", "--lora_dir", str(files["lora_dir"])]
    elif case == "missing file":
        flags = ["--lora", str(tmp_path / "none.safetensors")]
    else:
        state = random_kohya(tiny_model("eps"), 12)
        key = "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"
        state[key] = torch.randn(state[key].shape[0], 768)
        save_state_dict(state, tmp_path / "sd15.safetensors")
        flags = ["--lora", str(tmp_path / "sd15.safetensors")]
    argv = ["--config", str(files["config"]), "--ckpt", str(files["safetensors"]), "--outdir", str(tmp_path / "out"), *FAST, *flags]
    assert main(argv, "txt2img") != 0
    import re

    assert re.search(message, capsys.readouterr().err)
    assert not list((tmp_path / "out").glob("samples/*.png"))
