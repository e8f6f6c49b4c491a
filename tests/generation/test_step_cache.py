"""--cache_interval / --cache_depth (step caching, DeepCache) in a run: the PNG is DDIM's with the
UNet's step cache installed by hand (whose numbers are checked against diffusers in
tests/modules/diffusionmodules/test_deepcache.py), every sampler counts UNet calls, each batch starts
afresh; bad values explained. --compile of both steps: tests/generation/test_control.py (one compiled
run for step caching and ControlNets).

Both sides run the same operations in the same order on the same CPU: pixels agree to one uint8 level.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import sample_images
from ldm.generation import main
from ldm.generation.errors import UsageError
from ldm.generation.model import Model
from ldm.generation.run import seed_everything
from ldm.generation.settings import ModelSettings, SamplingSettings
from ldm.generation.tasks import Txt2ImgPipeline
from ldm.loading import load_model_from_config
from ldm.models.diffusion.ddim import DDIMSampler
from ldm.modules.diffusionmodules.deepcache import install

FAST = ["--H", "64", "--W", "64", "--steps", "6", "--n_samples", "1", "--n_iter", "1", "--precision", "full", "--seed", "3",
        "--no_watermark", "--prompt", "a box"]


def run(files, outdir, *flags: str) -> list[np.ndarray]:
    assert main(["--config", str(files["config"]), "--ckpt", str(files["safetensors"]), "--outdir", str(outdir), *FAST, *flags],
                "txt2img") == 0
    return sample_images(outdir)


def test_txt2img_with_step_caching_is_ddim_on_the_cached_unet(tiny_files, tmp_path):
    got = run(tiny_files, tmp_path / "cached", "--cache_interval", "3", "--cache_depth", "0")
    model = load_model_from_config(tiny_files["config"], tiny_files["safetensors"])
    cache = install(model.model.diffusion_model, interval=3, depth=0)
    with torch.no_grad(), cache:
        seed_everything(3)
        c, uc = model.get_learned_conditioning(["a box"]), model.get_learned_conditioning([""])
        z, _ = DDIMSampler(model).sample(6, 1, (4, 8, 8), c, verbose=False, unconditional_guidance_scale=9.0,
                                         unconditional_conditioning=uc, eta=0.0)
        x = torch.clamp((model.decode_first_stage(z) + 1) / 2, 0, 1)
    assert (cache.full_calls, cache.shallow_calls) == (3, 4)  # the original's 6-step grid holds 7 steps: FSSFSSF
    expected = (255.0 * x[0].numpy().transpose(1, 2, 0)).astype(np.uint8)
    assert np.abs(got[0].astype(int) - expected.astype(int)).max() <= 1
    plain = run(tiny_files, tmp_path / "plain")
    assert np.abs(plain[0].astype(int) - got[0].astype(int)).max() > 2  # the shallow calls changed the image


@pytest.mark.parametrize("sampler", ["heun", "dpmpp_2m", "plms"])
def test_every_sampler_counts_unet_calls_and_each_batch_starts_afresh(tiny_files, sampler):
    model = Model(ModelSettings(config=tiny_files["config"], ckpt=tiny_files["safetensors"], device="cpu", precision="full",
                                cache_interval=2))
    pipeline = Txt2ImgPipeline(model, SamplingSettings(sampler=sampler, steps=4, seed=1), height=64, width=64)
    pipeline.start()
    for _ in range(2):
        pipeline(["a box"])
    cache, calls = model._step_cache, pipeline.unet_calls_per_batch
    assert cache.full_calls == 2 * ((calls + 1) // 2) and cache.shallow_calls == 2 * (calls // 2)


def test_bad_cache_settings_are_explained(tiny_files, tmp_path, capsys):
    with pytest.raises(UsageError, match="--cache_interval 0: at least 1"):
        ModelSettings(cache_interval=0)
    argv = ["--config", str(tiny_files["config"]), "--ckpt", str(tiny_files["safetensors"]), "--outdir", str(tmp_path), *FAST]
    assert main([*argv, "--cache_interval", "2", "--cache_depth", "9"], "txt2img") != 0
    assert "--cache_interval/--cache_depth: cache depth 9: this UNet takes 0 to 3" in capsys.readouterr().err
    assert not list(tmp_path.glob("samples/*.png"))
