"""scripts/inpaint.py, depth2img.py, upscale.py and unclip.py as a user runs them, on tiny models of
each family with random weights: files, sizes (padding cropped off), metadata, depth maps, k-samplers,
and the bad inputs each task refuses. Their pixels against the original demos, rewritten call for
call: tests/scripts/test_original_demos.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from conftest import (ROOT, assert_same_images, load_script, randomize_, sample_images, samples, tiny_family_config,
                      tiny_family_model, tiny_unclip_config, tiny_x4_config)
from ldm.checkpoint import save_state_dict
from ldm.generation import main
from ldm.generation.images import load_init_image, pad_to_multiple
from ldm.generation.run import seed_everything
from ldm.loading import build_model, load_model_from_config

FAST = ["--steps", "2", "--n_iter", "1", "--precision", "full", "--no_watermark", "--seed", "7"]


def write_model(folder: Path, config, model) -> dict[str, Path]:
    OmegaConf.save(config, folder / "config.yaml")
    save_state_dict(model.state_dict(), folder / "model.safetensors")
    return {"config": folder / "config.yaml", "ckpt": folder / "model.safetensors"}


@pytest.fixture(scope="module")
def families(tmp_path_factory, tiny_clip_stats) -> dict[str, dict[str, Path]]:
    root = tmp_path_factory.mktemp("families")
    def random(config, seed: int):
        return config, randomize_(build_model(config, "cpu"), seed).eval()

    models = {
        "inpaint": (tiny_family_config("inpainting"), tiny_family_model("inpainting", seed=11)),
        "depth2img": (tiny_family_config("depth"), tiny_family_model("depth", seed=12)),
        "upscale": random(tiny_x4_config(), 13),
        "variations": random(tiny_unclip_config("h"), 14),
        "variations-l": random(tiny_unclip_config("l", tiny_clip_stats), 15),
    }
    files = {}
    for name, (config, model) in models.items():
        (root / name).mkdir()
        files[name] = write_model(root / name, config, model)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(root / "image.png")
    mask = np.zeros((40, 50), np.uint8)
    mask[10:30, 20:45] = 255
    Image.fromarray(mask).save(root / "mask.png")
    depth = np.tile(np.linspace(0, 65535, 50, dtype=np.uint16), (40, 1))
    Image.fromarray(depth).save(root / "depth.png")
    Image.fromarray(rng.integers(0, 256, (16, 24, 3), dtype=np.uint8)).save(root / "small.png")
    Image.fromarray(rng.integers(0, 256, (80, 100, 3), dtype=np.uint8)).save(root / "photo.png")
    files["inputs"] = {"image": root / "image.png", "mask": root / "mask.png", "depth": root / "depth.png", "small": root / "small.png",
                       "photo": root / "photo.png"}
    return files


def run(families, task: str, outdir: Path, *flags: str, model: str | None = None) -> int:
    files = families[model or task]
    return main(["--config", str(files["config"]), "--ckpt", str(files["ckpt"]), "--outdir", str(outdir), *FAST, *flags], task)


def to_uint8(x: torch.Tensor) -> list[np.ndarray]:
    x = torch.clamp((x + 1.0) / 2.0, min=0.0, max=1.0)
    return [(255.0 * s.cpu().numpy().transpose(1, 2, 0)).astype(np.uint8) for s in x]


def demo_image(path: Path) -> torch.Tensor:
    """The demos' input: edge-padded to multiples of 64 (at least 128), then x / 127.5 - 1."""
    array = pad_to_multiple(np.asarray(Image.open(path).convert("RGB")), 64)
    return torch.from_numpy(array).float().permute(2, 0, 1)[None] / 127.5 - 1.0


def text(model, prompt: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    return model.get_learned_conditioning(n * [prompt]), model.get_learned_conditioning(n * [""])


def test_depth2img_takes_a_depth_map(families, tmp_path):
    inputs = families["inputs"]
    flags = ["--image", str(inputs["image"]), "--strength", "1.0"]
    assert run(families, "depth2img", tmp_path / "midas", *flags) == 0
    assert run(families, "depth2img", tmp_path / "map", *flags, "--depth-map", str(inputs["depth"])) == 0
    [midas], [given] = sample_images(tmp_path / "midas"), sample_images(tmp_path / "map")
    assert given.shape == (40, 50, 3) and not np.array_equal(midas, given)  # the depth map conditions the result
    with Image.open(samples(tmp_path / "map")[0]) as png:
        assert png.text["depth_map"] == "depth.png"


@pytest.mark.parametrize("strength", [0.5, 1.0])
def test_depth2img_with_a_k_sampler(families, tmp_path, strength):
    """Euler on Karras sigmas: the image's latent noised to the sigma 2 steps from the end (strength
    0.5 of 4), or, at strength 1.0, all 4 steps from the original's noise alone; depth-conditioned."""
    from ldm.models.diffusion.samplers import SAMPLERS
    from ldm.models.diffusion.sampling import SampleRequest

    inputs = families["inputs"]
    assert run(families, "depth2img", tmp_path, "--image", str(inputs["image"]), "--prompt", "a hall", "--steps", "4",
               "--strength", str(strength), "--sampler", "Euler Karras") == 0
    model = load_model_from_config(families["depth2img"]["config"], families["depth2img"]["ckpt"])
    image = demo_image(inputs["image"])
    with torch.no_grad():
        seed_everything(7)
        z = model.get_first_stage_encoding(model.encode_first_stage(image))
        c, uc = text(model, "a hall", 1)
        c_cat = model.depth_conditioning(image)
        cond, uncond = {"c_concat": [c_cat], "c_crossattn": [c]}, {"c_concat": [c_cat], "c_crossattn": [uc]}
        start = {"init": z, "denoise_steps": 2} if strength < 1 else {"denoise_steps": 4}
        latents = SAMPLERS["euler"].sample(model, SampleRequest(cond, uncond, 9.0, 4, tuple(z.shape), schedule="karras", **start))
        expected = [x[:40, :50] for x in to_uint8(model.decode_first_stage(latents))]
    assert_same_images(sample_images(tmp_path), expected)


def test_variations_with_a_k_sampler(families, tmp_path):
    from ldm.models.diffusion.samplers import SAMPLERS
    from ldm.models.diffusion.sampling import SampleRequest

    inputs = families["inputs"]
    assert run(families, "variations", tmp_path, "--image", str(inputs["photo"]), "--prompt", "a photo", "--noise_level", "100",
               "--sampler", "dpmpp_2m") == 0
    model = load_model_from_config(families["variations"]["config"], families["variations"]["ckpt"])
    with torch.no_grad():
        seed_everything(7)
        image = load_init_image(str(inputs["photo"]), 64)
        adm, level = model.noise_augmentor(model.embedder(image), noise_level=torch.tensor([100]))
        adm = torch.cat((adm, level), 1)
        uc, c = model.get_learned_conditioning([""]), model.get_learned_conditioning(["a photo"])
        request = SampleRequest({"c_crossattn": [c], "c_adm": adm}, {"c_crossattn": [uc], "c_adm": torch.zeros_like(adm)},
                                10.0, 2, (1, 4, 8, 8), schedule="karras")
        expected = to_uint8(model.decode_first_stage(SAMPLERS["dpmpp_2m"].sample(model, request)))
    assert_same_images(sample_images(tmp_path), expected)


def test_unclip_l_needs_its_clip_statistics(families, tmp_path, tiny_clip_stats, capsys):
    inputs = families["inputs"]
    config = OmegaConf.load(families["variations-l"]["config"])
    config.model.params.noise_aug_config.params.clip_stats_path = str(tmp_path / "absent" / "ViT-L-14_stats.th")
    OmegaConf.save(config, tmp_path / "no-stats.yaml")
    flags = ["--ckpt", str(families["variations-l"]["ckpt"]), "--image", str(inputs["photo"]), "--outdir", str(tmp_path / "out"), *FAST]
    assert main(["--config", str(tmp_path / "no-stats.yaml"), *flags], "variations") == 1
    err = capsys.readouterr().err
    assert "ViT-L-14_stats.th" in err and "--clip_stats" in err and not (tmp_path / "out").exists()
    assert main(["--config", str(tmp_path / "no-stats.yaml"), *flags, "--clip_stats", str(tiny_clip_stats)], "variations") == 0
    assert len(sample_images(tmp_path / "out")) == 1


@pytest.mark.parametrize("script, task", [("inpaint.py", "inpaint"), ("depth2img.py", "depth2img"), ("upscale.py", "upscale"),
                                          ("unclip.py", "variations")])
def test_scripts_are_the_tasks_entry_points(script, task):
    source = (ROOT / "scripts" / script).read_text()
    assert f'main(sys.argv[1:], "{task}")' in source
    load_script(f"scripts/{script}")  # imports cleanly


def bad_inputs(families, tmp_path):
    inputs = families["inputs"]
    Image.new("L", (30, 30)).save(tmp_path / "other-size.png")
    (tmp_path / "notes.png").write_text("not an image")
    flat = tmp_path / "flat.png"
    Image.new("L", (50, 40), 128).save(flat)
    image = ["--image", str(inputs["image"])]
    return {
        "mask size": ("inpaint", [*image, "--mask", str(tmp_path / "other-size.png")], 1, "--mask", "30x30 differs from the image's 50x40"),
        "mask unreadable": ("inpaint", [*image, "--mask", str(tmp_path / "notes.png")], 1, "--mask", "cannot be read as an image"),
        "no mask": ("inpaint", image, 2, "--mask", "the following arguments are required: --mask"),
        "flat depth map": ("depth2img", [*image, "--depth-map", str(flat)], 1, "--depth-map", "the depth map is constant"),
        "noise level": ("upscale", [*image, "--noise_level", "351"], 2, "--noise_level 351", "must be in [0, 350]"),
        "wrong family": ("upscale", image, 2, "the upscale task needs a LatentUpscaleDiffusion model", "x4-upscaling.yaml"),
        "image missing": ("variations", ["--image", str(tmp_path / "absent.png")], 1, "--image", "no such file"),
    }


@pytest.mark.parametrize("case", ["mask size", "mask unreadable", "no mask", "flat depth map", "noise level", "wrong family",
                                  "image missing"])
def test_bad_input_is_explained_and_writes_nothing(families, tmp_path, capsys, case):
    task, flags, status, *messages = bad_inputs(families, tmp_path)[case]
    model = "inpaint" if case == "wrong family" else None
    out = tmp_path / "out"
    assert run(families, task, out, *flags, model=model) == status
    err = capsys.readouterr().err
    assert all(m in err for m in messages), err
    assert not out.exists() and "Traceback" not in err
