"""The benchmark's peer: diffusers' StableDiffusionPipeline on an original-layout SD2 checkpoint,
timed the way ``scripts/txt2img.py --skip_first --time_file`` times ours.

The pipeline is assembled offline from the same checkpoint and config ``txt2img.py`` reads: UNet
and VAE through diffusers' own single-file conversion functions, the OpenCLIP text tower as a
``CLIPTextModel`` (its last layer dropped for the configs' ``layer: penultimate``), the tokenizer
from open_clip's vocabulary, and a PNDM scheduler in its PLMS mode (the PLMS sampler's timesteps
and model evaluations). Nothing is downloaded. One warm-up call, then ``--n_iter`` timed calls of
``--n_samples`` images each.

``--compile`` compiles the UNet as ``txt2img.py --compile`` does (on the CPU: inductor with frozen
weights, the same options and cache). ``--openvino`` runs the same UNet through OpenVINO instead
(``openvino.convert_model`` for this batch size and image size, compiled for the CPU at the run's
precision: bf16 where the default precision is bf16, else f32); text encoder and VAE stay PyTorch's.
The default precision (``autocast``) follows ``txt2img.py``'s: float32 on a CPU without native bf16.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping

import torch
from PIL import Image

import numpy as np

from ldm.devices import device_name, synchronize
from ldm.checkpoint import load_state_dict
from ldm.fileio import write_text
from ldm.generation.speed import compile_module, resolve_precision
from ldm.loading import load_config
from ldm.modules.encoders.modules import open_clip_model_config

logger = logging.getLogger("benchmark_diffusers")

PRECISIONS = ("full", "autocast", "half")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompt", default="A photo")
    p.add_argument("--config", required=True, help="original SD2 inference config (YAML)")
    p.add_argument("--ckpt", required=True, help="original-layout checkpoint (.ckpt or .safetensors)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--n_iter", type=int, default=2)
    p.add_argument("--n_samples", type=int, default=1)
    p.add_argument("--H", type=int, default=512)
    p.add_argument("--W", type=int, default=512)
    p.add_argument("--scale", type=float, default=9.0, help="classifier-free guidance scale (txt2img's default)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="autocast",
        help="full: float32; autocast: float32 weights under autocast (float16 on CUDA, bfloat16 on the CPU, as txt2img.py); "
        "half: float16 weights (diffusers' usual set-up, CUDA only)",
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--outdir", required=True)
    p.add_argument("--skip_first", action="store_true", help="one untimed, unsaved warm-up call first")
    p.add_argument("--time_file", help="write the seconds of the timed calls here")
    p.add_argument("--stats_file", help="write the run's statistics (JSON) here")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet")
    p.add_argument("--compile_mode", default=None)
    p.add_argument("--openvino", action="store_true", help="run the UNet through OpenVINO (CPU only)")
    args = p.parse_args(argv)
    if args.compile and args.openvino:
        p.error("--compile and --openvino exclude each other")
    for name in ("steps", "n_iter", "n_samples"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    return args


def _plain(config: Any) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(load_config(config), resolve=True)


def _load_strict(module: torch.nn.Module, state: Mapping[str, torch.Tensor], what: str) -> None:
    own = module.state_dict()
    missing, unexpected = own.keys() - state.keys(), state.keys() - own.keys()
    if missing or unexpected:
        raise RuntimeError(f"{what}: converted weights do not fit (missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})")
    module.load_state_dict(state, strict=True, assign=True)


def build_unet(config: dict, state: Mapping[str, torch.Tensor]):
    """diffusers' UNet2DConditionModel with the checkpoint's ``model.diffusion_model.*`` weights."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, create_unet_diffusers_config_from_ldm

    params = config["model"]["params"]
    unet_cfg = create_unet_diffusers_config_from_ldm(config, state)
    unet_cfg["sample_size"] = params["image_size"]
    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_cfg)
    _load_strict(unet, convert_ldm_unet_checkpoint(state, unet_cfg), "UNet")
    return unet


def build_vae(config: dict, state: Mapping[str, torch.Tensor]):
    """diffusers' AutoencoderKL with the checkpoint's ``first_stage_model.*`` weights."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint, create_vae_diffusers_config_from_ldm

    vae_cfg = create_vae_diffusers_config_from_ldm(config, state)
    vae_cfg["sample_size"] = 8 * config["model"]["params"]["image_size"]
    with torch.device("meta"):
        vae = AutoencoderKL(**vae_cfg)
    _load_strict(vae, convert_ldm_vae_checkpoint(state, vae_cfg), "VAE")
    return vae


def build_text_encoder(config: dict, state: Mapping[str, torch.Tensor]):
    """The OpenCLIP text tower as a CLIPTextModel whose output is the configured layer after the
    final LayerNorm: for ``penultimate``, the model simply has one layer fewer (as SD2 in diffusers)."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel

    enc = config["model"]["params"]["cond_stage_config"]["params"]
    text = open_clip_model_config(enc.get("arch", "ViT-H-14"))["text_cfg"]
    if text.get("quick_gelu") or text.get("ls_init_value") or text.get("pool_type", "argmax") != "argmax":
        raise ValueError(f"text tower {enc.get('arch')!r} has options a CLIPTextModel lacks")
    layers = text["layers"] - (1 if enc.get("layer", "last") == "penultimate" else 0)
    cfg = CLIPTextConfig(
        vocab_size=text["vocab_size"],
        hidden_size=text["width"],
        intermediate_size=int(text["width"] * text.get("mlp_ratio", 4.0)),
        num_hidden_layers=layers,
        num_attention_heads=text["heads"],
        max_position_embeddings=text["context_length"],
        hidden_act="gelu",
        layer_norm_eps=1e-5,
    )
    model = CLIPTextModel(cfg)
    own = model.state_dict()
    converted = convert_open_clip_checkpoint(model, state)
    if not any(k.startswith("text_model.") for k in own):  # transformers 5 dropped the wrapper
        converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    converted = {k: v for k, v in converted.items() if k in own}
    missing = [k for k in own if k not in converted and not k.endswith("position_ids")]
    if missing:
        raise RuntimeError(f"text encoder: no weights for {missing[:5]}")
    model.load_state_dict(converted, strict=False)
    return model.eval()


def build_tokenizer(config: dict, folder: str | os.PathLike):
    """A CLIPTokenizer with open_clip's vocabulary and merges, padding with ``!`` (id 0) as
    open_clip does; the files are written to ``folder``."""
    import open_clip
    from transformers import CLIPTokenizer

    arch = config["model"]["params"]["cond_stage_config"]["params"].get("arch", "ViT-H-14")
    tok = open_clip.get_tokenizer(arch)
    renamed = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    folder = Path(folder)
    (folder / "vocab.json").write_text(json.dumps({renamed.get(k, k): v for k, v in tok.encoder.items()}))
    merges = sorted(tok.bpe_ranks, key=tok.bpe_ranks.get)
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="!", model_max_length=77)


def build_scheduler(config: dict):
    """PNDM in PLMS mode with the config's schedule: the same timesteps as the PLMS sampler."""
    from diffusers import PNDMScheduler

    params = config["model"]["params"]
    return PNDMScheduler(
        num_train_timesteps=params.get("timesteps", 1000),
        beta_start=params["linear_start"],
        beta_end=params["linear_end"],
        beta_schedule="scaled_linear",
        skip_prk_steps=True,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="v_prediction" if params.get("parameterization", "eps") == "v" else "epsilon",
    )


def build_pipeline(config: Any, ckpt: str | os.PathLike, tokenizer_folder: str | os.PathLike):
    """The whole StableDiffusionPipeline (no safety checker) on CPU in float32, SDPA attention."""
    from diffusers import StableDiffusionPipeline
    from diffusers.models.attention_processor import AttnProcessor2_0

    config = _plain(config)
    if config["model"]["params"]["unet_config"]["params"].get("use_native_mha"):
        raise ValueError("the diffusers peer needs the original-layout config and checkpoint, not the native-MHA ones")
    state = load_state_dict(ckpt)
    pipe = StableDiffusionPipeline(
        vae=build_vae(config, state),
        text_encoder=build_text_encoder(config, state),
        tokenizer=build_tokenizer(config, tokenizer_folder),
        unet=build_unet(config, state),
        scheduler=build_scheduler(config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.unet.set_attn_processor(AttnProcessor2_0())
    pipe.vae.set_attn_processor(AttnProcessor2_0())
    pipe.set_progress_bar_config(disable=True)
    return pipe


class OpenVINOUNet(torch.nn.Module):
    """Stands in for the pipeline's UNet: the same call, computed by an OpenVINO compiled model."""

    def __init__(self, unet: torch.nn.Module, compiled: Any):
        super().__init__()
        self.config = unet.config
        self.compiled = compiled

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor, *args: Any,
                return_dict: bool = False, **kwargs: Any) -> tuple[torch.Tensor]:
        inputs = (sample.float().numpy(), np.asarray(timestep, dtype=np.int64), encoder_hidden_states.float().numpy())
        return (torch.from_numpy(self.compiled(inputs)[0]),)


def openvino_unet(unet: torch.nn.Module, batch: int, height: int, width: int, context: tuple[int, int], bf16: bool) -> OpenVINOUNet:
    """``unet`` converted by ``openvino.convert_model`` for ``batch`` latents (static shapes) and compiled
    for the CPU with bf16 or f32 inference precision."""
    import openvino as ov

    class Plain(torch.nn.Module):
        def __init__(self, unet: torch.nn.Module):
            super().__init__()
            self.unet = unet

        def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
            return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]

    channels = unet.config.in_channels
    example = (torch.randn(batch, channels, height, width), torch.tensor(999, dtype=torch.long), torch.randn(batch, *context))
    start = time.perf_counter()
    with torch.no_grad():
        model = ov.convert_model(Plain(unet).eval(), example_input=example)
    precision = "bf16" if bf16 else "f32"
    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY"})
    logger.info("OpenVINO %s: UNet converted and compiled (%s) in %.1f s", ov.__version__, precision, time.perf_counter() - start)
    return OpenVINOUNet(unet, compiled)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    import diffusers

    device = torch.device(args.device)
    if args.precision == "half" and device.type != "cuda":
        raise SystemExit("--precision half needs a CUDA device")
    if args.openvino and device.type != "cpu":
        raise SystemExit("--openvino runs on the CPU only")
    precision = args.precision if args.precision == "half" else resolve_precision(args.precision, device)
    with tempfile.TemporaryDirectory() as tokenizer_folder:
        pipe = build_pipeline(args.config, args.ckpt, tokenizer_folder)
    pipe.to(device=device, dtype=torch.float16 if precision == "half" else torch.float32)
    if args.compile:
        compile_module(pipe.unet, device, args.compile_mode)
    if args.openvino:
        latent = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
        batch = 2 * args.n_samples if args.scale > 1.0 else args.n_samples  # classifier-free guidance doubles it
        context = (pipe.tokenizer.model_max_length, pipe.text_encoder.config.hidden_size)
        pipe.unet = openvino_unet(pipe.unet, batch, args.H // latent, args.W // latent, context, precision == "autocast")

    def generate(generator: torch.Generator) -> torch.Tensor:
        """Text encoding, sampling and decoding to [0, 1] images on the CPU: what txt2img.py times."""
        with torch.inference_mode(), torch.autocast(device.type, enabled=precision == "autocast"):
            out = pipe(
                args.prompt,
                height=args.H,
                width=args.W,
                num_inference_steps=args.steps,
                guidance_scale=args.scale,
                num_images_per_prompt=args.n_samples,
                generator=generator,
                output_type="pt",
            ).images
        return out.float().cpu()

    warmup_seconds = None
    if args.skip_first:
        start = time.perf_counter()
        generate(torch.Generator(device).manual_seed(args.seed))
        warmup_seconds = time.perf_counter() - start
        logger.info("warm-up done in %.3f s", warmup_seconds)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    samples = Path(args.outdir) / "samples"
    samples.mkdir(parents=True, exist_ok=True)
    first = len(list(samples.glob("*.png")))
    generator = torch.Generator(device).manual_seed(args.seed)
    seconds, images = 0.0, 0
    for i in range(args.n_iter):
        synchronize(device)
        start = time.perf_counter()
        batch = generate(generator)
        synchronize(device)
        elapsed = time.perf_counter() - start
        seconds += elapsed
        for image in batch:  # saved untimed, as txt2img.py does
            array = (255.0 * image.permute(1, 2, 0).numpy()).astype("uint8")
            Image.fromarray(array).save(samples / f"{first + images:05}.png")
            images += 1
        logger.info("iteration %d/%d: %.3f s", i + 1, args.n_iter, elapsed)

    stats = {
        "seconds": seconds,
        "warmup_seconds": warmup_seconds,
        "seconds_per_image": seconds / images,
        "images": images,
        "peak_gpu_memory_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        "device": device_name(device),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "sampler": "pndm (plms)",
        "steps": args.steps,
        "H": args.H,
        "W": args.W,
        "n_samples": args.n_samples,
        "n_iter": args.n_iter,
        "precision": args.precision,
        "computes_in": precision,
        "attention": "openvino" if args.openvino else "sdpa",
        "compile": (args.compile_mode or "default") if args.compile else False,
        "openvino": __import__("openvino").__version__ if args.openvino else None,
    }
    if args.time_file:
        write_text(args.time_file, f"{seconds:.6f}\n", overwrite=True)
    if args.stats_file:
        write_text(args.stats_file, json.dumps(stats, indent=2) + "\n", overwrite=True)
    print(f"{images} images in {samples}; {seconds:.3f} s, {seconds / images:.3f} s/image")


if __name__ == "__main__":
    sys.exit(main())
