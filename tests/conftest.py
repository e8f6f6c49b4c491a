"""Shared fixtures: a tiny model with the SD2 structure and random weights, its config and
checkpoint files. Every test module builds its models from here, never its own copy. Also the
helpers the modules share (comparisons, image files, child processes), each defined once."""

from __future__ import annotations

import gzip
import importlib.util
import json
import math
import os
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from ldm.checkpoint import save_state_dict
from ldm.loading import build_model

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
CONFIGS = ROOT / "configs" / "stable-diffusion"
# Every tensor (key and shape) of each real SD2 checkpoint (tests/fixtures/checkpoint-keys/README.md).
CHECKPOINT_KEYS = FIXTURES / "checkpoint-keys"


def tiny_config(parameterization: str = "eps", native_mha: bool = False):
    """The tiny SD2-structured config, with the text tower pointed at the fixture folder."""
    cfg = OmegaConf.load(FIXTURES / "tiny-v2-inference.yaml")
    cfg.model.params.cond_stage_config.params.arch = f"local-dir:{FIXTURES / 'tiny-clip'}"
    if parameterization != "eps":
        cfg.model.params.parameterization = parameterization
    if native_mha:
        cfg.model.params.unet_config.params.use_native_mha = True
    return cfg


@torch.no_grad()
def randomize_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter random values, the zero-initialised output layers included,
    so that comparisons exercise every weight. Buffers (the schedule) are left alone."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        if name.endswith("logit_scale"):
            p.fill_(math.log(1 / 0.07))
        elif p.ndim == 1 and ("norm" in name or "ln_" in name) and name.endswith("weight"):
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
        else:
            fan_in = p[0].numel() if p.ndim > 1 else p.numel()
            p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(fan_in))
    return module


def load_script(relative_path: str):
    """Import a program of scripts/ or tools/ (not a package) as a module, for in-process tests."""
    path = ROOT / relative_path
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error ||a - b|| / ||b||: the measure every numerical comparison uses."""
    return ((a - b).norm() / b.norm()).item()


def assert_draws_normals(run, count: int, shape=(2, 4, 8, 8), seed: int = 0) -> None:
    """``run()`` consumes exactly ``count`` normal draws of ``shape`` from the global generator,
    as the original samplers do (so a seeded run's later images match the original's)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        run()
    after = torch.randn(1)
    torch.manual_seed(seed)
    for _ in range(count):
        torch.randn(shape)
    assert torch.equal(after, torch.randn(1))


def assert_computes_as(model, reference) -> None:
    """``model``'s text encoder, UNet and decoder give ``reference``'s outputs bit for bit."""
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([3, 700])
    with torch.no_grad():
        c = model.get_learned_conditioning(["a red cube", ""])
        assert torch.equal(c, reference.get_learned_conditioning(["a red cube", ""]))
        assert torch.equal(model.apply_model(x, t, c), reference.apply_model(x, t, c))
        assert torch.equal(model.decode_first_stage(x[:1]), reference.decode_first_stage(x[:1]))


def rel_max(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference relative to the largest value, max |a - b| / max |b|, in float64."""
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max()).item()


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float) -> None:
    """``actual`` is ``expected`` to ``rtol`` of its largest value (:func:`rel_max`)."""
    error = rel_max(actual, expected)
    assert error <= rtol, f"max |diff| is {error:.3g} x max |expected|, more than {rtol}"


def unet_inputs(batch: int = 2, size: int = 8, tokens: int = 7, seed: int = 0, timesteps=(1, 981)):
    """A tiny UNet's inputs: latents (batch, 4, size, size), the first ``batch`` of ``timesteps`` and
    a text context (batch, tokens, 48), drawn in that order from a generator seeded ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, size, size, generator=gen)
    return x, torch.tensor(timesteps[:batch]), torch.randn(batch, tokens, 48, generator=gen)


# -- images and processes
def samples(outdir: Path) -> list[Path]:
    """The images a run wrote into ``outdir/samples``, in order."""
    return sorted((outdir / "samples").glob("*.png"))


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def sample_images(outdir: Path) -> list[np.ndarray]:
    """The pixels of the images a run wrote into ``outdir/samples``, in order."""
    return [pixels(path) for path in samples(outdir)]


def assert_valid_pngs(paths) -> None:
    for path in paths:
        with Image.open(path) as image:
            image.load()  # a truncated PNG fails here


def assert_same_images(got: list[np.ndarray], expected: list[np.ndarray]) -> None:
    """Images of the same computation in another order of float operations: a truncation to uint8
    may flip, by one level, in under 1% of the pixels."""
    assert len(got) == len(expected) > 0
    for a, b in zip(got, expected):
        assert a.shape == b.shape
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1 and (a != b).mean() < 0.01


def shape_mask(image: np.ndarray) -> np.ndarray:
    """The pixels of a drawn shape: the background is white, every shape colour has a dark channel."""
    return image.min(-1) < 150


def fill_ratio(mask: np.ndarray) -> float:
    """How much of its bounding box a shape fills (circle pi/4, square 1, triangle 1/2)."""
    ys, xs = np.nonzero(mask)
    return float(mask.sum() / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a child Python process: this checkout's ``ldm`` first on its path (not an
    installed copy), and one thread as in this process (thread counts change float rounding)."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", **extra}


needs_proc = pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds processes through /proc")


def pids_with_env(*entries: str) -> list[int]:
    """The processes whose environment holds every ``NAME=value`` of ``entries``, in sessions other
    than this process's: the children started in their own session (torchrun's, a benchmark run's)
    and what they started, not this process's helpers (multiprocessing's resource tracker)."""
    wanted, ours = {entry.encode() for entry in entries}, os.getsid(0)
    found = []
    for path in Path("/proc").iterdir():
        if not path.name.isdigit():
            continue
        try:
            session = int((path / "stat").read_text().rsplit(")", 1)[1].split()[3])
            if session != ours and wanted <= set((path / "environ").read_bytes().split(b"\0")):
                found.append(int(path.name))
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return found


def wait_for(condition, timeout: float, alive=lambda: True, what: str = "the condition") -> None:
    """Poll ``condition()`` until it holds; fail if ``alive()`` turns false first or after ``timeout``
    seconds (a bound against hanging, not a measurement)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert alive(), f"ended before {what}"
        assert time.monotonic() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.05)


def vae_training_config() -> dict:
    """main.py's config for 3 steps of the tiny autoencoder on 16x16 shapes (f = 8: 2x2 latents,
    enough to run every layer), checkpointed every 2 steps."""
    return {
        "seed": 1,
        "model": {
            "target": "ldm.training.autoencoder.AutoencoderTrainer",
            "params": {"first_stage_config": tiny_config().model.params.first_stage_config, "learning_rate": 1e-3},
        },
        "data": {"target": "ldm.data.shapes.ShapesDataset", "params": {"num_samples": 8, "size": 16}, "batch_size": 4},
        "lightning": {"checkpoint_every_n_steps": 2, "trainer": {"max_steps": 3, "log_every_n_steps": 1, "enable_progress_bar": False}},
    }


def save_yaml(config: dict, path: Path) -> str:
    OmegaConf.save(OmegaConf.create(config), path)
    return str(path)


def tiny_model(parameterization: str = "eps", native_mha: bool = False, seed: int = 0):
    return randomize_(build_model(tiny_config(parameterization, native_mha), "cpu"), seed).eval()


@pytest.fixture(scope="session", autouse=True)
def compile_cache(tmp_path_factory):
    """Inductor's caches and --compile's packages in a folder of this test session: the tests neither
    read nor fill a user's cache, and compile from scratch as on a fresh CI machine."""
    patch = pytest.MonkeyPatch()
    patch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path_factory.mktemp("torchinductor")))
    yield
    patch.undo()


@pytest.fixture(scope="session", params=["eps", "v"])
def parameterization(request) -> str:
    return request.param


@pytest.fixture()
def model(parameterization, tiny_eps_model, tiny_v_model):
    """The tiny model of the current ``parameterization`` (eps, then v)."""
    return tiny_eps_model if parameterization == "eps" else tiny_v_model


def tiny_sgm_config(native_mha: bool = False):
    """The tiny config with SD-Turbo's model class (the generative-models layout of sd-turbo.yaml)."""
    cfg = tiny_config(native_mha=native_mha)
    cfg.model.target = OmegaConf.load(CONFIGS / "sd-turbo.yaml").model.target
    return cfg


@pytest.fixture(scope="session")
def tiny_eps_model():
    return tiny_model("eps")


@pytest.fixture(scope="session")
def tiny_v_model():
    return tiny_model("v")


@pytest.fixture(scope="session")
def tiny_files(tmp_path_factory) -> dict[str, Path]:
    """On disk: the tiny config (YAML) and its random checkpoint as safetensors and .ckpt."""
    folder = tmp_path_factory.mktemp("tiny")
    config = folder / "tiny-v2-inference.yaml"
    OmegaConf.save(tiny_config(), config)
    state = tiny_model("eps").state_dict()
    save_state_dict(state, folder / "tiny.safetensors")
    save_state_dict(state, folder / "tiny.ckpt")
    return {"config": config, "safetensors": folder / "tiny.safetensors", "ckpt": folder / "tiny.ckpt"}


def family_keys(name: str) -> dict[str, list[int]]:
    """Every tensor (key -> shape) of a real SD2 checkpoint: ``sd2`` (text-to-image), ``inpainting``,
    ``depth``, ``x4-upscaler``, ``unclip-l`` or ``unclip-h``."""
    stem = "sd2" if name == "sd2" else f"sd2-{name}"
    with gzip.open(CHECKPOINT_KEYS / f"{stem}-checkpoint-keys.json.gz", "rt") as f:
        return json.load(f)["tensors"]


@pytest.fixture(scope="session")
def sd2_keys() -> dict[str, list[int]]:
    return family_keys("sd2")


def diffusers_unet_twin(config, model):
    """diffusers' UNet2DConditionModel holding ``model``'s UNet weights, configured and converted
    by diffusers' own single-file converter from the original-layout ``config`` and state dict."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, create_unet_diffusers_config_from_ldm

    original_config = OmegaConf.to_container(config, resolve=True)
    state = model.state_dict()
    dconfig = create_unet_diffusers_config_from_ldm(original_config, state)
    unet = UNet2DConditionModel(**dconfig)
    unet.load_state_dict(convert_ldm_unet_checkpoint(state, dconfig), strict=True)
    return unet.eval()


def diffusers_vae_twin(config, model, scaling_factor: float | None = None):
    """diffusers' AutoencoderKL holding ``model``'s first stage, by diffusers' single-file converter."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint, create_vae_diffusers_config_from_ldm

    state = model.state_dict()
    dconfig = create_vae_diffusers_config_from_ldm(
        OmegaConf.to_container(config, resolve=True), state, scaling_factor=scaling_factor
    )
    vae = AutoencoderKL(**dconfig)
    vae.load_state_dict(convert_ldm_vae_checkpoint(state, dconfig), strict=True)
    return vae.eval()


@pytest.fixture(scope="session")
def diffusers_unet(tiny_eps_model):
    """diffusers' UNet holding the tiny model's UNet weights (eps and v tiny models share them)."""
    return diffusers_unet_twin(tiny_config(), tiny_eps_model)


@pytest.fixture(scope="session")
def guidance_inputs(tiny_eps_model) -> dict[str, torch.Tensor]:
    """A sampler run's inputs for the tiny model: x_T (batch 2, 4x8x8 latents) and the
    conditional and unconditional ("") text contexts."""
    with torch.no_grad():
        c = tiny_eps_model.get_learned_conditioning(["a red cube on a wooden table", "a lighthouse at dusk"])
        uc = tiny_eps_model.get_learned_conditioning(["", ""])
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1234))
    return {"x_T": x_T, "c": c, "uc": uc}


# The tiny models' tensors are far too small to gain from intra-op threads, and threads
# waiting on each other on a busy shared CPU make a sampling run 10-20 times slower.
torch.set_num_threads(1)


# -- inpainting and depth families
FAMILY_FIXTURES = {"inpainting": "tiny-v2-inpainting-inference.yaml", "depth": "tiny-v2-midas-inference.yaml"}
FAMILY_CONFIGS = {"inpainting": "v2-inpainting-inference.yaml", "depth": "v2-midas-inference.yaml"}


def tiny_family_config(family: str, native_mha: bool = False):
    """The tiny config of an SD2 family ("inpainting" or "depth"), text tower as in :func:`tiny_config`."""
    cfg = OmegaConf.load(FIXTURES / FAMILY_FIXTURES[family])
    cfg.model.params.cond_stage_config.params.arch = tiny_config().model.params.cond_stage_config.params.arch
    if native_mha:
        cfg.model.params.unet_config.params.use_native_mha = True
    return cfg


@torch.no_grad()
def tiny_family_model(family: str, native_mha: bool = False, seed: int = 0):
    model = randomize_(build_model(tiny_family_config(family, native_mha), "cpu"), seed).eval()
    if family == "depth":
        # Random weights put the head's last convolution below zero almost everywhere: its ReLU
        # would make the depth constant (zero). Raised, the ReLU clips some pixels but not all.
        model.depth_model.model.scratch.output_conv[4].bias.add_(2.0)
    return model


@pytest.fixture(scope="session")
def tiny_inpaint_model():
    return tiny_family_model("inpainting")


@pytest.fixture(scope="session")
def tiny_depth_model():
    return tiny_family_model("depth")


# Our (the original's) names -> transformers' names; the ViT's fused qkv is split separately
# and the backbone's ImageNet classifier (``pretrained.model.head``, unused by DPT) has no peer.
MIDAS_TO_TRANSFORMERS = [
    (r"pretrained\.model\.cls_token", "dpt.embeddings.cls_token"),
    (r"pretrained\.model\.pos_embed", "dpt.embeddings.position_embeddings"),
    (r"pretrained\.model\.patch_embed\.proj\.", "dpt.embeddings.projection."),
    (r"pretrained\.model\.patch_embed\.backbone\.stem\.conv\.", "dpt.embeddings.backbone.bit.embedder.convolution."),
    (r"pretrained\.model\.patch_embed\.backbone\.stem\.norm\.", "dpt.embeddings.backbone.bit.embedder.norm."),
    (r"pretrained\.model\.patch_embed\.backbone\.stages\.(\d+)\.blocks\.(\d+)\.",
     r"dpt.embeddings.backbone.bit.encoder.stages.\1.layers.\2."),
    (r"pretrained\.model\.blocks\.(\d+)\.norm1\.", r"dpt.encoder.layer.\1.layernorm_before."),
    (r"pretrained\.model\.blocks\.(\d+)\.norm2\.", r"dpt.encoder.layer.\1.layernorm_after."),
    (r"pretrained\.model\.blocks\.(\d+)\.attn\.proj\.", r"dpt.encoder.layer.\1.attention.output.dense."),
    (r"pretrained\.model\.blocks\.(\d+)\.mlp\.fc1\.", r"dpt.encoder.layer.\1.intermediate.dense."),
    (r"pretrained\.model\.blocks\.(\d+)\.mlp\.fc2\.", r"dpt.encoder.layer.\1.output.dense."),
    (r"pretrained\.model\.norm\.", "dpt.layernorm."),
    (r"pretrained\.act_postprocess3\.0\.project\.0\.", "neck.reassemble_stage.readout_projects.2.0."),
    (r"pretrained\.act_postprocess4\.0\.project\.0\.", "neck.reassemble_stage.readout_projects.3.0."),
    (r"pretrained\.act_postprocess3\.3\.", "neck.reassemble_stage.layers.2.projection."),
    (r"pretrained\.act_postprocess4\.3\.", "neck.reassemble_stage.layers.3.projection."),
    (r"pretrained\.act_postprocess4\.4\.", "neck.reassemble_stage.layers.3.resize."),
    (r"scratch\.layer(\d)_rn\.", lambda m: f"neck.convs.{int(m[1]) - 1}."),
    # refinenet4 fuses the coarsest level, which transformers' fusion stage takes first.
    (r"scratch\.refinenet(\d)\.out_conv\.", lambda m: f"neck.fusion_stage.layers.{4 - int(m[1])}.projection."),
    (r"scratch\.refinenet(\d)\.resConfUnit(\d)\.conv(\d)\.",
     lambda m: f"neck.fusion_stage.layers.{4 - int(m[1])}.residual_layer{m[2]}.convolution{m[3]}."),
    (r"scratch\.output_conv\.(\d)\.", r"head.head.\1."),
]


def midas_to_transformers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The original MiDaS DPT-Hybrid state (``depth_model.model.*`` without the prefix) in transformers' names."""
    import re

    out = {}
    for key, value in state.items():
        qkv = re.fullmatch(r"pretrained\.model\.blocks\.(\d+)\.attn\.qkv\.(weight|bias)", key)
        if qkv:
            for name, part in zip(("query", "key", "value"), value.chunk(3)):
                out[f"dpt.encoder.layer.{qkv[1]}.attention.attention.{name}.{qkv[2]}"] = part
            continue
        if key.startswith("pretrained.model.head."):
            continue
        for pattern, replacement in MIDAS_TO_TRANSFORMERS:
            new, hits = re.subn("^" + pattern, replacement, key)
            if hits:
                out[new] = value
                break
        else:
            raise KeyError(f"no transformers name for {key}")
    return out


@pytest.fixture(scope="session")
def transformers_dpt(tiny_depth_model):
    """transformers' DPTForDepthEstimation (hybrid) holding the tiny depth model's MiDaS weights."""
    from transformers import DPTConfig, DPTForDepthEstimation

    p = tiny_family_config("depth").model.params.depth_stage_config.params
    grid = p.image_size // 16
    config = DPTConfig(
        is_hybrid=True, hidden_size=p.embed_dim, num_hidden_layers=12, num_attention_heads=p.num_heads,
        intermediate_size=4 * p.embed_dim, layer_norm_eps=1e-6, image_size=p.image_size, patch_size=16,
        backbone_out_indices=[0, 1, 8, 11], readout_type="project", reassemble_factors=[1, 1, 1, 0.5],
        neck_hidden_sizes=[p.backbone_channels[0], p.backbone_channels[1], p.embed_dim, p.embed_dim],
        fusion_hidden_size=p.features, backbone_featmap_shape=[1, p.backbone_channels[2], grid, grid],
        backbone_config=dict(
            global_padding="same", layer_type="bottleneck", depths=list(p.backbone_layers),
            hidden_sizes=list(p.backbone_channels), embedding_size=p.stem_channels,
            out_features=["stage1", "stage2", "stage3"], embedding_dynamic_padding=True,
        ),
    )
    model = DPTForDepthEstimation(config).eval()
    model.load_state_dict(midas_to_transformers(tiny_depth_model.depth_model.model.state_dict()), strict=True)
    return model


def sd2_ddim_scheduler(parameterization: str):
    """diffusers' DDIMScheduler configured as SD2's DDIM (the original's grid and final alpha)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type="epsilon" if parameterization == "eps" else "v_prediction",
    )


# -- upscaler and unCLIP families
TINY_CLIP_ARCH = f"local-dir:{FIXTURES / 'tiny-clip'}"
# unCLIP-L embeds with OpenAI CLIP (``model:``), unCLIP-H with OpenCLIP (``arch:``).
UNCLIP_EMBEDDERS = {
    "l": ("ldm.modules.encoders.modules.ClipImageEmbedder", "model"),
    "h": ("ldm.modules.encoders.modules.FrozenOpenCLIPImageEmbedder", "arch"),
}


def tiny_x4_config(native_mha: bool = False):
    """The tiny x4-upscaler-structured config (tests/fixtures/tiny-x4-upscaling.yaml)."""
    cfg = OmegaConf.load(FIXTURES / "tiny-x4-upscaling.yaml")
    cfg.model.params.cond_stage_config.params.arch = TINY_CLIP_ARCH
    if native_mha:
        cfg.model.params.unet_config.params.use_native_mha = True
    return cfg


def tiny_unclip_config(kind: str, clip_stats_path=None, native_mha: bool = False):
    """The tiny unCLIP-structured config with the -L (``kind="l"``) or -H image embedder, and the
    embedding statistics file ``clip_stats_path`` (as unCLIP-L has; none: mean 0, std 1)."""
    cfg = OmegaConf.load(FIXTURES / "tiny-v2-1-stable-unclip-inference.yaml")
    params = cfg.model.params
    params.cond_stage_config.params.arch = TINY_CLIP_ARCH
    target, arch_param = UNCLIP_EMBEDDERS[kind]
    params.embedder_config = {"target": target, "params": {arch_param: TINY_CLIP_ARCH}}
    if clip_stats_path is not None:
        params.noise_aug_config.params.clip_stats_path = str(clip_stats_path)
    if native_mha:
        params.unet_config.params.use_native_mha = True
    return cfg


def write_clip_stats(path: Path, dim: int = 32, seed: int = 0) -> Path:
    """Random embedding statistics in the format of Karlo's ViT-L-14_stats.th: (mean, std)."""
    gen = torch.Generator().manual_seed(seed)
    torch.save((0.3 * torch.randn(dim, generator=gen), 0.5 + torch.rand(dim, generator=gen)), path)
    return path


@pytest.fixture(scope="session")
def tiny_clip_stats(tmp_path_factory) -> Path:
    return write_clip_stats(tmp_path_factory.mktemp("karlo") / "ViT-L-14_stats.th")


@pytest.fixture(scope="session")
def tiny_x4_model():
    return randomize_(build_model(tiny_x4_config(), "cpu"), seed=5).eval()


@pytest.fixture(scope="session")
def tiny_unclip_models(tiny_clip_stats) -> dict:
    """The tiny unCLIP models, -L (with random embedding statistics) and -H, by kind."""
    return {
        "l": randomize_(build_model(tiny_unclip_config("l", tiny_clip_stats), "cpu"), seed=6).eval(),
        "h": randomize_(build_model(tiny_unclip_config("h"), "cpu"), seed=7).eval(),
    }


def transformers_vision_twin(embedder):
    """transformers' CLIPVisionModelWithProjection holding an image embedder's tower
    (``embedder.model.visual``, OpenCLIP layout), its weights mapped key by key: an independent
    implementation of the same network (QuickGELU for OpenAI CLIP, GELU for OpenCLIP ViT-H)."""
    from open_clip.transformer import QuickGELU
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    visual = embedder.model.visual
    blocks = visual.transformer.resblocks
    config = CLIPVisionConfig(
        hidden_size=visual.conv1.weight.shape[0],
        intermediate_size=blocks[0].mlp.c_fc.weight.shape[0],
        num_hidden_layers=len(blocks),
        num_attention_heads=blocks[0].attn.num_heads,
        image_size=visual.image_size[0],
        patch_size=visual.conv1.weight.shape[-1],
        projection_dim=visual.proj.shape[1],
        hidden_act="quick_gelu" if isinstance(blocks[0].mlp.gelu, QuickGELU) else "gelu",
        layer_norm_eps=1e-5,
    )
    ours = {k: v for k, v in visual.state_dict().items()}
    state = {
        "vision_model.embeddings.class_embedding": ours["class_embedding"],
        "vision_model.embeddings.patch_embedding.weight": ours["conv1.weight"],
        "vision_model.embeddings.position_embedding.weight": ours["positional_embedding"],
        "visual_projection.weight": ours["proj"].T,
    }
    for kind in ("weight", "bias"):
        state[f"vision_model.pre_layrnorm.{kind}"] = ours[f"ln_pre.{kind}"]
        state[f"vision_model.post_layernorm.{kind}"] = ours[f"ln_post.{kind}"]
        for i in range(len(blocks)):
            src, dst = f"transformer.resblocks.{i}.", f"vision_model.encoder.layers.{i}."
            for name, tensor in zip("qkv", ours[f"{src}attn.in_proj_{kind}"].chunk(3)):
                state[f"{dst}self_attn.{name}_proj.{kind}"] = tensor
            for a, b in [("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
                         ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")]:
                state[f"{dst}{b}.{kind}"] = ours[f"{src}{a}.{kind}"]
    model = CLIPVisionModelWithProjection(config)
    model.load_state_dict(state, strict=True)
    return model.eval()


def transformers_text_twin(embedder, layers: int | None = None):
    """transformers' CLIPTextModel holding an OpenCLIP text tower (``embedder.model``), converted
    by diffusers' ``convert_open_clip_checkpoint``; ``layers`` keeps the first blocks only (a
    diffusers SD2 folder keeps all but the last: its last hidden state is SD2's penultimate layer)."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel

    text = embedder.model
    width = text.token_embedding.weight.shape[1]
    blocks = len(text.transformer.resblocks)
    config = CLIPTextConfig(
        vocab_size=text.token_embedding.weight.shape[0], hidden_size=width, intermediate_size=4 * width,
        num_hidden_layers=blocks if layers is None else layers, num_attention_heads=text.transformer.resblocks[0].attn.num_heads,
        max_position_embeddings=text.positional_embedding.shape[0], hidden_act="gelu", layer_norm_eps=1e-5,
        bos_token_id=49406, eos_token_id=49407,
    )
    model = CLIPTextModel(config).eval()
    state = {f"cond_stage_model.{k}": v for k, v in embedder.state_dict().items()}
    converted = convert_open_clip_checkpoint(model, state)
    own = model.state_dict().keys()
    # transformers >= 5 dropped the ``text_model.`` level of CLIPTextModel's keys; the text
    # projection is not part of CLIPTextModel, nor used by SD; blocks beyond ``layers`` are dropped.
    converted = {k if k in own else k.removeprefix("text_model."): v for k, v in converted.items()}
    model.load_state_dict({k: v for k, v in converted.items() if k in own}, strict=True)
    return model


def transformers_tokenizer(embedder, pad_with_zero: bool = True):
    """transformers' CLIPTokenizer built from an OpenCLIP tokenizer's BPE vocabulary and merges.
    It pads with "!" (id 0, as open_clip and diffusers' SD2 tokenizer pad), which makes "!" a special
    token split out of prompts ("!!" is two tokens, one for open_clip); ``pad_with_zero=False``
    pads with the end token instead, and tokenizes "!" as open_clip does."""
    from transformers import CLIPTokenizer

    bpe = embedder.tokenizer
    merges = [pair for pair, _ in sorted(bpe.bpe_ranks.items(), key=lambda item: item[1])]
    start, end = bpe.decoder[bpe.sot_token_id], bpe.decoder[bpe.eot_token_id]
    return CLIPTokenizer(vocab=dict(bpe.encoder), merges=merges, bos_token=start, eos_token=end, unk_token=end,
                         pad_token=bpe.decoder[0] if pad_with_zero else end, model_max_length=embedder.max_length)


def guided_ddim(model, cond, uncond, x_T: torch.Tensor, steps: int = 10, scale: float = 9.0) -> torch.Tensor:
    """Final latents of a guided DDIM run (eta 0) from ``x_T`` with conditioning dicts."""
    from ldm.models.diffusion.ddim import DDIMSampler

    samples, _ = DDIMSampler(model).sample(
        steps, x_T.shape[0], tuple(x_T.shape[1:]), conditioning=cond, unconditional_conditioning=uncond,
        unconditional_guidance_scale=scale, x_T=x_T.clone(), verbose=False,
    )
    return samples


# -- diffusers-format folders
def diffusers_pipeline_twin(config, model, parameterization: str = "eps"):
    """diffusers' StableDiffusionPipeline (the inpainting one for a 9-channel UNet) holding ``model``,
    every component converted by diffusers' and transformers' own code: the folder a user holds."""
    from diffusers import StableDiffusionInpaintPipeline, StableDiffusionPipeline

    unet = diffusers_unet_twin(config, model)
    pipeline = StableDiffusionInpaintPipeline if unet.config.in_channels == 9 else StableDiffusionPipeline
    return pipeline(
        vae=diffusers_vae_twin(config, model), text_encoder=transformers_text_twin(model.cond_stage_model, len(model.cond_stage_model.model.transformer.resblocks) - 1),
        tokenizer=transformers_tokenizer(model.cond_stage_model), unet=unet, scheduler=sd2_ddim_scheduler(parameterization),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


@pytest.fixture(scope="session")
def tiny_diffusers_folders(tmp_path_factory, tiny_eps_model, tiny_v_model) -> dict[str, Path]:
    """The tiny eps and v models as diffusers folders written by diffusers' ``save_pretrained``."""
    root = tmp_path_factory.mktemp("diffusers")
    folders = {}
    for parameterization, model in (("eps", tiny_eps_model), ("v", tiny_v_model)):
        folders[parameterization] = root / parameterization
        diffusers_pipeline_twin(tiny_config(parameterization), model, parameterization).save_pretrained(folders[parameterization])
    return folders


# -- LoRA
RANK = 4  # of the random LoRAs


def random_kohya(model, seed: int, alpha: float = 2.0) -> dict[str, torch.Tensor]:
    """A random kohya-format LoRA on every kind of module a LoRA file holds: text encoder q/k/v/out/
    fc1/fc2, UNet attention, projections, feed-forward, resnet 3x3 convolutions (LoCon), time
    embedding projections, down- and up-samplers."""
    from ldm.lora import model_targets

    gen = torch.Generator().manual_seed(seed)
    kinds = ("_self_attn_q_proj", "_self_attn_k_proj", "_self_attn_v_proj", "_self_attn_out_proj", "_mlp_fc1", "_mlp_fc2",
             "attn1_to_q", "attn1_to_k", "attn1_to_v", "attn1_to_out_0", "attn2_to_k", "attn2_to_v", "proj_in", "proj_out",
             "ff_net_0_proj", "ff_net_2", "resnets_0_conv1", "resnets_1_conv2", "time_emb_proj", "downsamplers_0_conv",
             "upsamplers_0_conv", "conv_shortcut")
    state = {}
    for name, target in model_targets(model).items():
        if not name.startswith(("lora_unet_", "lora_te_")) or not name.endswith(kinds):
            continue
        shape = target.weight.shape
        kernel = tuple(shape[2:])
        down = torch.randn(RANK, shape[1], *kernel, generator=gen) / shape[1] ** 0.5
        up = torch.randn(shape[0], RANK, *((1, 1) if kernel else ()), generator=gen) / RANK**0.5
        state.update({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(alpha)})
    return state
