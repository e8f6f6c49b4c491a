"""The original repository's demos (Stability-AI/stablediffusion: scripts/gradio/inpainting.py,
depth2img.py and superresolution.py, scripts/streamlit/stableunclip.py) as their users run them
on this package: model loading and generation functions rewritten call for call, their imports
pointed at this package, the UI (gradio, streamlit) left out. On tiny models of each family they
give the same pixels as this project's task scripts for the same seed; those are checked against
diffusers' pipelines in tests/models/diffusion/test_{inpaint,depth,upscale,unclip}.py.

Left out or changed, because of the test setting only: the watermark encoder (invisible-watermark
is not a dependency; ``put_watermark`` gets None, and the task scripts run with --no_watermark);
``torch.autocast("cuda")`` (no CUDA here: a no-op that warns); ``.cuda()`` (the CPU); the MiDaS
input size given to AddMiDaS (the tiny MiDaS's, where the demo's 384 is the real model's); the
inpainting demo never seeds torch (its posterior and DDIM noise come from whatever state the
global generator is in), so the test seeds it as the task script does.

Both sides run the same operations in the same order on the same CPU, so the pixels agree except
where float rounding flips a truncation to uint8: at most one level, in under 1% of the pixels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import PIL
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from pytorch_lightning import seed_everything

from conftest import (assert_same_images, load_script, randomize_, sample_images, tiny_family_config, tiny_family_model,
                      tiny_unclip_config, tiny_x4_config)
from ldm.data.util import AddMiDaS
from ldm.generation import main
from ldm.loading import build_model
from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.ddpm import LatentUpscaleDiffusion, LatentUpscaleFinetuneDiffusion
from ldm.models.diffusion.dpm_solver import DPMSolverSampler
from ldm.util import exists, instantiate_from_config

put_watermark = load_script("scripts/txt2img.py").put_watermark
SEED = 7


# -- the demos' shared pieces ------------------------------------------------------------------
def initialize_model(config: Path, ckpt: Path) -> DDIMSampler:
    """scripts/gradio/*.py: build from the config, load the checkpoint's state_dict, DDIM."""
    config = OmegaConf.load(config)
    model = instantiate_from_config(config.model)
    model.load_state_dict(torch.load(ckpt)["state_dict"], strict=False)
    return DDIMSampler(model.to(torch.device("cpu")))


def pad_image(input_image: Image.Image) -> Image.Image:
    """Edge padding to multiples of 64, at least 128, as the gradio demos."""
    pad_w, pad_h = np.max(((2, 2), np.ceil(np.array(input_image.size) / 64).astype(int)), axis=0) * 64 - input_image.size
    return Image.fromarray(np.pad(np.array(input_image), ((0, pad_h), (0, pad_w), (0, 0)), mode="edge"))


def to_images(x_samples: torch.Tensor) -> list[Image.Image]:
    result = torch.clamp((x_samples + 1.0) / 2.0, min=0.0, max=1.0).cpu().numpy().transpose(0, 2, 3, 1) * 255
    return [put_watermark(Image.fromarray(img.astype(np.uint8)), None) for img in result]


def repeat(x: torch.Tensor, n: int) -> torch.Tensor:
    """einops' ``repeat(x, "1 ... -> n ...", n=n)``."""
    return x.expand(n, *x.shape[1:]).clone()


# -- scripts/gradio/inpainting.py --------------------------------------------------------------
def inpainting_batch(image, mask, txt, device, num_samples=1):
    image = torch.from_numpy(np.array(image.convert("RGB"))[None].transpose(0, 3, 1, 2)).to(dtype=torch.float32) / 127.5 - 1.0
    mask = np.array(mask.convert("L")).astype(np.float32)[None, None] / 255.0
    mask[mask < 0.5] = 0
    mask[mask >= 0.5] = 1
    mask = torch.from_numpy(mask)
    masked_image = image * (mask < 0.5)
    return {"image": repeat(image.to(device), num_samples), "txt": num_samples * [txt],
            "mask": repeat(mask.to(device), num_samples), "masked_image": repeat(masked_image.to(device), num_samples)}


def inpaint(sampler, image, mask, prompt, seed, scale, ddim_steps, num_samples=1, w=512, h=512):
    device = torch.device("cpu")
    model = sampler.model
    start_code = torch.from_numpy(np.random.RandomState(seed).randn(num_samples, 4, h // 8, w // 8)).to(device=device, dtype=torch.float32)
    with torch.no_grad():
        batch = inpainting_batch(image, mask, txt=prompt, device=device, num_samples=num_samples)
        c = model.cond_stage_model.encode(batch["txt"])
        c_cat = []
        for ck in model.concat_keys:
            cc = batch[ck].float()
            if ck != model.masked_image_key:
                cc = torch.nn.functional.interpolate(cc, size=[h // 8, w // 8])
            else:
                cc = model.get_first_stage_encoding(model.encode_first_stage(cc))
            c_cat.append(cc)
        c_cat = torch.cat(c_cat, dim=1)
        cond = {"c_concat": [c_cat], "c_crossattn": [c]}
        uc_full = {"c_concat": [c_cat], "c_crossattn": [model.get_unconditional_conditioning(num_samples, "")]}
        shape = [model.channels, h // 8, w // 8]
        samples_cfg, _ = sampler.sample(ddim_steps, num_samples, shape, cond, verbose=False, eta=1.0,
                                        unconditional_guidance_scale=scale, unconditional_conditioning=uc_full, x_T=start_code)
        return to_images(model.decode_first_stage(samples_cfg))


# -- scripts/gradio/depth2img.py ---------------------------------------------------------------
def depth_batch(image, txt, device, num_samples=1, model_type="dpt_hybrid", net_size=384):
    image = torch.from_numpy(np.array(image.convert("RGB"))).to(dtype=torch.float32) / 127.5 - 1.0
    batch = AddMiDaS(model_type=model_type, net_size=net_size)({"jpg": image, "txt": num_samples * [txt]})
    batch["jpg"] = repeat(batch["jpg"].permute(2, 0, 1)[None].to(device), num_samples)
    batch["midas_in"] = repeat(torch.from_numpy(batch["midas_in"][None, ...]).to(device), num_samples)
    return batch


def paint_depth(sampler, image, prompt, t_enc, seed, scale, num_samples=1, callback=None, do_full_sample=False):
    device = torch.device("cpu")
    model = sampler.model
    seed_everything(seed)
    with torch.no_grad():
        batch = depth_batch(image, txt=prompt, device=device, num_samples=num_samples,
                            net_size=model.depth_model.model.image_size)
        z = model.get_first_stage_encoding(model.encode_first_stage(batch[model.first_stage_key]))
        c = model.cond_stage_model.encode(batch["txt"])
        c_cat = []
        for ck in model.concat_keys:
            cc = model.depth_model(batch[ck])
            depth_min, depth_max = torch.amin(cc, dim=[1, 2, 3], keepdim=True), torch.amax(cc, dim=[1, 2, 3], keepdim=True)
            display_depth = (cc - depth_min) / (depth_max - depth_min)
            depth_image = Image.fromarray((display_depth[0, 0, ...].cpu().numpy() * 255.0).astype(np.uint8))
            cc = torch.nn.functional.interpolate(cc, size=z.shape[2:], mode="bicubic", align_corners=False)
            depth_min, depth_max = torch.amin(cc, dim=[1, 2, 3], keepdim=True), torch.amax(cc, dim=[1, 2, 3], keepdim=True)
            c_cat.append(2.0 * (cc - depth_min) / (depth_max - depth_min) - 1.0)
        c_cat = torch.cat(c_cat, dim=1)
        cond = {"c_concat": [c_cat], "c_crossattn": [c]}
        uc_full = {"c_concat": [c_cat], "c_crossattn": [model.get_unconditional_conditioning(num_samples, "")]}
        if not do_full_sample:
            z_enc = sampler.stochastic_encode(z, torch.tensor([t_enc] * num_samples).to(model.device))
        else:
            z_enc = torch.randn_like(z)
        samples = sampler.decode(z_enc, cond, t_enc, unconditional_guidance_scale=scale,
                                 unconditional_conditioning=uc_full, callback=callback)
        return [depth_image] + to_images(model.decode_first_stage(samples))


def predict_depth(sampler, input_image, prompt, steps, num_samples, scale, seed, eta, strength):
    image = pad_image(input_image.convert("RGB"))
    sampler.make_schedule(steps, ddim_eta=eta, verbose=True)
    t_enc = min(int(strength * steps), steps - 1)
    return paint_depth(sampler, image, prompt, t_enc, seed, scale, num_samples, None, do_full_sample=strength == 1.0)


# -- scripts/gradio/superresolution.py ---------------------------------------------------------
def superresolution_batch(image, txt, device, num_samples=1):
    image = torch.from_numpy(np.array(image.convert("RGB"))).to(dtype=torch.float32) / 127.5 - 1.0
    return {"lr": repeat(image.permute(2, 0, 1)[None].to(device), num_samples), "txt": num_samples * [txt]}


def make_noise_augmentation(model, batch, noise_level=None):
    x_low = batch[model.low_scale_key].to(memory_format=torch.contiguous_format).float()
    return model.low_scale_model(x_low, noise_level)


def paint_superresolution(sampler, image, prompt, seed, scale, h, w, steps, num_samples=1, callback=None, eta=0.0,
                          noise_level=None):
    device = torch.device("cpu")
    model = sampler.model
    seed_everything(seed)
    start_code = torch.from_numpy(np.random.RandomState(seed).randn(num_samples, model.channels, h, w)).to(device=device, dtype=torch.float32)
    with torch.no_grad():
        batch = superresolution_batch(image, txt=prompt, device=device, num_samples=num_samples)
        c = model.cond_stage_model.encode(batch["txt"])
        if isinstance(model, LatentUpscaleFinetuneDiffusion):
            c_cat = []
            for ck in model.concat_keys:
                cc = batch[ck]
                if exists(model.reshuffle_patch_size):
                    cc = model.reshuffle(cc)
                c_cat.append(cc)
            c_cat = torch.cat(c_cat, dim=1)
            cond = {"c_concat": [c_cat], "c_crossattn": [c]}
            uc_full = {"c_concat": [c_cat], "c_crossattn": [model.get_unconditional_conditioning(num_samples, "")]}
        elif isinstance(model, LatentUpscaleDiffusion):
            x_augment, noise_level = make_noise_augmentation(model, batch, noise_level)
            cond = {"c_concat": [x_augment], "c_crossattn": [c], "c_adm": noise_level}
            uc_full = {"c_concat": [x_augment], "c_crossattn": [model.get_unconditional_conditioning(num_samples, "")],
                       "c_adm": noise_level}
        else:
            raise NotImplementedError()
        samples, _ = sampler.sample(steps, num_samples, [model.channels, h, w], cond, verbose=False, eta=eta,
                                    unconditional_guidance_scale=scale, unconditional_conditioning=uc_full,
                                    x_T=start_code, callback=callback)
    with torch.no_grad():
        return to_images(model.decode_first_stage(samples))


def predict_superresolution(sampler, input_image, prompt, steps, num_samples, scale, seed, eta, noise_level):
    image = pad_image(input_image.convert("RGB"))
    width, height = image.size
    noise_level = torch.Tensor(num_samples * [noise_level]).to(sampler.model.device).long()
    sampler.make_schedule(steps, ddim_eta=eta, verbose=True)
    return paint_superresolution(sampler, image, prompt, seed, scale, height, width, steps, num_samples, None,
                                 noise_level=noise_level)


# -- scripts/streamlit/stableunclip.py -----------------------------------------------------------
def load_img(image: Image.Image) -> torch.Tensor:
    w, h = (x - x % 64 for x in image.size)
    image = np.array(image.resize((w, h), resample=PIL.Image.LANCZOS)).astype(np.float32) / 255.0
    return 2.0 * torch.from_numpy(image[None].transpose(0, 3, 1, 2)) - 1.0


def make_conditionings_from_input(model, image, batch_size, noise_level, weight=1.0):
    init_img = repeat(load_img(image), batch_size)
    with torch.no_grad():
        adm_cond = model.embedder(init_img)
        if model.noise_augmentor is not None:
            c_adm, noise_level_emb = model.noise_augmentor(
                adm_cond, noise_level=repeat(torch.tensor([noise_level]).to(model.device), batch_size))
            adm_cond = torch.cat((c_adm, noise_level_emb), 1) * weight
        return adm_cond, torch.zeros_like(adm_cond), weight


def sample_unclip(model, sampler, prompt, n_runs, n_samples, H, W, C, f, scale, ddim_steps, ddim_eta,
                  negative_prompt="", adm_cond=None, adm_uc=None):
    batch_size = n_samples
    prompts = batch_size * [prompt]
    all_samples = []
    with model.ema_scope():
        for _ in range(n_runs):
            shape = [C, H // f, W // f]
            uc = model.get_learned_conditioning(batch_size * [negative_prompt]) if scale != 1.0 else None
            c = model.get_learned_conditioning(prompts)
            c = {"c_crossattn": [c], "c_adm": adm_cond}
            uc = {"c_crossattn": [uc], "c_adm": adm_uc}
            samples_ddim, _ = sampler.sample(S=ddim_steps, conditioning=c, batch_size=batch_size, shape=shape, verbose=False,
                                             unconditional_guidance_scale=scale, unconditional_conditioning=uc,
                                             eta=ddim_eta, x_T=None, callback=None, ucg_schedule=None)
            all_samples.append(torch.clamp((model.decode_first_stage(samples_ddim) + 1.0) / 2.0, min=0.0, max=1.0))
    return all_samples


# -- the tests -----------------------------------------------------------------------------------
def save_family(folder: Path, model, config) -> dict[str, Path]:
    """A config and an original-style checkpoint (a pickle holding ``state_dict``)."""
    folder.mkdir()
    OmegaConf.save(config, folder / "config.yaml")
    torch.save({"state_dict": model.state_dict(), "global_step": 0}, folder / "model.ckpt")
    return {"config": folder / "config.yaml", "ckpt": folder / "model.ckpt"}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, dict[str, Path]]:
    root = tmp_path_factory.mktemp("demos")
    families = {
        "inpaint": (tiny_family_model("inpainting", seed=21), tiny_family_config("inpainting")),
        "depth2img": (tiny_family_model("depth", seed=22), tiny_family_config("depth")),
        "upscale": (randomize_(build_model(tiny_x4_config(), "cpu"), 23), tiny_x4_config()),
        "variations": (randomize_(build_model(tiny_unclip_config("h"), "cpu"), 24), tiny_unclip_config("h")),
    }
    out = {name: save_family(root / name, model, config) for name, (model, config) in families.items()}
    rng = np.random.default_rng(1)
    images = {"image": (40, 50), "small": (16, 24), "photo": (80, 100)}
    for name, (h, w) in images.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / f"{name}.png")
    mask = np.zeros((40, 50), np.uint8)
    mask[10:30, 20:45] = 255
    Image.fromarray(mask).save(root / "mask.png")
    out["inputs"] = {name: root / f"{name}.png" for name in [*images, "mask"]}
    return out


def task_script(files, task: str, outdir: Path, *flags: str) -> list[np.ndarray]:
    """This project's script for ``task`` on the same checkpoint: its samples, as uint8 arrays."""
    model = files[task]
    argv = ["--config", str(model["config"]), "--ckpt", str(model["ckpt"]), "--outdir", str(outdir), "--n_iter", "1",
            "--precision", "full", "--no_watermark", "--seed", str(SEED), *flags]
    assert main(argv, task) == 0
    return sample_images(outdir)


def cropped(images: list[Image.Image], h: int, w: int) -> list[np.ndarray]:
    """The demos return the padded images; the task scripts crop the padding off."""
    return [np.asarray(image)[:h, :w] for image in images]


def test_the_gradio_inpainting_demo(files, tmp_path):
    inputs = files["inputs"]
    got = task_script(files, "inpaint", tmp_path, "--image", str(inputs["image"]), "--mask", str(inputs["mask"]),
                      "--prompt", "a cat", "--n_samples", "2", "--steps", "4")
    sampler = initialize_model(**files["inpaint"])
    image, mask = pad_image(Image.open(inputs["image"]).convert("RGB")), pad_image(Image.open(inputs["mask"]).convert("RGB"))
    width, height = image.size
    seed_everything(SEED)
    result = inpaint(sampler, image, mask, "a cat", SEED, 10.0, 4, num_samples=2, w=width, h=height)
    assert_same_images(got, cropped(result, 40, 50))


@pytest.mark.parametrize("strength", [0.5, 1.0])
def test_the_gradio_depth2img_demo(files, tmp_path, strength):
    inputs = files["inputs"]
    got = task_script(files, "depth2img", tmp_path, "--image", str(inputs["image"]), "--prompt", "a hall", "--steps", "4",
                      "--strength", str(strength), "--scale", "9")
    sampler = initialize_model(**files["depth2img"])
    depth_image, *result = predict_depth(sampler, Image.open(inputs["image"]), "a hall", 4, 1, 9.0, SEED, 0.0, strength)
    assert depth_image.size == (sampler.model.depth_model.model.image_size,) * 2
    assert_same_images(got, cropped(result, 40, 50))


def test_the_gradio_superresolution_demo(files, tmp_path):
    inputs = files["inputs"]
    got = task_script(files, "upscale", tmp_path, "--image", str(inputs["small"]), "--prompt", "a photo",
                      "--noise_level", "30", "--steps", "4", "--scale", "9")
    sampler = initialize_model(**files["upscale"])
    result = predict_superresolution(sampler, Image.open(inputs["small"]), "a photo", 4, 1, 9.0, SEED, 0.0, 30)
    assert got[0].shape == (64, 96, 3)  # four times the input
    assert_same_images(got, cropped(result, 64, 96))


@pytest.mark.parametrize("sampler_name", ["DDIM", "DPM"])
def test_the_streamlit_stableunclip_demo(files, tmp_path, sampler_name):
    """Its page: seed_everything(seed) first, then the input image's noise-augmented embedding
    (one input, weight 1), then the samples (x_T drawn by the sampler it offers: DDIM or DPM)."""
    inputs = files["inputs"]
    got = task_script(files, "variations", tmp_path, "--image", str(inputs["photo"]), "--prompt", "a photo",
                      "--noise_level", "100", "--n_samples", "2", "--steps", "4", "--scale", "10", "--H", "64", "--W", "64",
                      *(["--dpm"] if sampler_name == "DPM" else []))
    model = initialize_model(**files["variations"]).model
    model.eval()  # the page's load_model_from_config
    seed_everything(SEED)
    adm_cond, adm_uc, weight = make_conditionings_from_input(model, Image.open(inputs["photo"]).convert("RGB"), 2, 100)
    adm_cond = torch.stack([adm_cond]).sum(0) / sum([weight])
    sampler = DPMSolverSampler(model) if sampler_name == "DPM" else DDIMSampler(model)
    [samples] = sample_unclip(model, sampler, "a photo", 1, 2, 64, 64, 4, 8, 10.0, 4, 0.0,
                              adm_cond=adm_cond, adm_uc=adm_uc)
    expected = [(255.0 * s.numpy().transpose(1, 2, 0)).astype(np.uint8) for s in samples]
    assert_same_images(got, expected)
