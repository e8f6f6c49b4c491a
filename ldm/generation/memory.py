"""What a run needs in memory, estimated from the model's structure before any weight is loaded,
so that an impossible size or batch is refused in seconds instead of failing after minutes.

The estimate (see docs/memory.md for the model and measured peaks against it) is

    1.1 x (weights + max(UNet step, decoder slice))

* weights: every parameter and buffer in float32 (as loaded), plus a half-precision copy of them
  under autocast (autocast caches its casts for the whole run);
* UNet step: the skip connections it keeps (every input block's output), the working set of the
  widest level (about 20 feature maps' worth where a spatial transformer runs: q, k, v, the GEGLU
  feed-forward's 8x-wide projection, residuals) and, where the attention kernel materialises the
  score matrix (``vanilla``, or SDPA left with only its math backend), two batch x heads x tokens^2
  maps of the largest self-attention;
* decoder slice: per image of a slice, the widest up-sampling level (its input three times and its
  output twice, at that level's resolution) and the mid-block's token^2 map when materialised.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ldm.generation.errors import GenerationError

logger = logging.getLogger(__name__)

GIB = 2**30
# Live feature maps per channel and token, beyond the skips (calibrated in docs/memory.md).
TRANSFORMER_LEVEL_MAPS = 20
RESBLOCK_LEVEL_MAPS = 6
# Allocator slack and transient copies the model above leaves out: measured peaks were 1.06-1.09x
# the bare estimate on the CPU (docs/memory.md), so the total carries this margin.
MARGIN = 1.1


@dataclass
class MemoryEstimate:
    weights: int
    unet: int
    decoder: int

    @property
    def total(self) -> int:
        return int(MARGIN * (self.weights + max(self.unet, self.decoder)))

    def describe(self) -> str:
        return (f"about {self.total / GIB:.1f} GiB (weights {self.weights / GIB:.1f}, UNet step {self.unet / GIB:.1f}, "
                f"decoder {self.decoder / GIB:.1f})")


def available_memory(device: torch.device) -> int | None:
    """Bytes the run may still allocate: free GPU memory, or the CPU's available memory under the
    tighter of the system's and the cgroup's limit; None where it cannot be read."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    if device.type != "cpu":
        return None
    limits = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                limits.append(int(line.split()[1]) * 1024)
    except OSError:
        pass
    try:
        maximum = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if maximum != "max":
            current = int(Path("/sys/fs/cgroup/memory.current").read_text())
            limits.append(int(maximum) - current)
    except (OSError, ValueError):
        pass
    return min(limits) if limits else None


def _materialises_scores(implementation: str, device: torch.device, disabled: set[str]) -> bool:
    """Whether the attention kernel builds the full score matrix."""
    if implementation == "vanilla":
        return True
    if implementation == "xformers":
        return False
    fused = {"flash"} if device.type == "cpu" else {"flash", "mem_efficient"}
    return fused <= disabled


def tensor_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers."""
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def _controlnet_bytes(unet: torch.nn.Module) -> int:
    """Bytes of a ControlNet of ``unet`` in float32: its encoder trunk and a 1x1 convolution per
    output (the hint encoder, ~1 MB, is left out)."""
    trunk = sum(tensor_bytes(getattr(unet, name)) for name in ("time_embed", "input_blocks", "middle_block"))
    return trunk + 4 * sum(c * c + c for c in unet.encoder_channels)


def _unet_step(unet: torch.nn.Module, tokens: int, batch: int, element: int, scores: bool, controlled: bool = False) -> int:
    """Peak bytes of one UNet evaluation at ``tokens`` latent pixels for ``batch`` inputs; ``controlled``:
    with ControlNet residuals, a second set of skip-sized maps held while the UNet runs."""
    from ldm.modules.attention import SpatialTransformer
    from ldm.modules.diffusionmodules.openaimodel import Downsample

    skips = working = score_bytes = 0
    scale = 1
    for block in unet.input_blocks:
        if any(isinstance(m, Downsample) for m in block):
            scale *= 4
        level_tokens = tokens // scale
        channels = _block_channels(block)
        skips += channels * level_tokens
        transformer = next((m for m in block.modules() if isinstance(m, SpatialTransformer)), None)
        maps = TRANSFORMER_LEVEL_MAPS if transformer is not None else RESBLOCK_LEVEL_MAPS
        working = max(working, maps * channels * level_tokens)
        if transformer is not None and scores:
            heads = _self_attention_heads(transformer)
            score_bytes = max(score_bytes, 2 * heads * level_tokens**2 * 4)
    return batch * (element * (skips * (2 if controlled else 1) + working) + score_bytes)


def _block_channels(block: torch.nn.Module) -> int:
    """Output channels of an input block: its last convolution's."""
    convs = [m for m in block.modules() if isinstance(m, torch.nn.Conv2d)]
    return convs[-1].out_channels


def _self_attention_heads(transformer: torch.nn.Module) -> int:
    attn = transformer.transformer_blocks[0].attn1
    return int(getattr(attn, "heads", None) or getattr(attn, "num_heads"))


def _decoder_image(vae: torch.nn.Module, height: int, width: int, element: int, scores: bool) -> int:
    """Peak bytes the decoder needs per image of a slice."""
    decoder = vae.decoder
    levels = len(decoder.up)
    peak = 0
    for i, level in enumerate(decoder.up):
        conv = level.block[0].conv1
        pixels = (height >> i) * (width >> i)
        peak = max(peak, (3 * conv.in_channels + 2 * conv.out_channels) * pixels * element)
    latent_tokens = (height >> (levels - 1)) * (width >> (levels - 1))
    if scores:
        peak = max(peak, 2 * latent_tokens**2 * 4)
    return peak


def estimate(model, height: int, width: int, batch: int, guided: bool, slice_size: int, tile: int | None = None,
             controlnets: int = 0) -> MemoryEstimate:
    """The estimate for a run of ``model`` (a :class:`ldm.generation.model.Model`, not loaded);
    ``tile``: the decoder runs on tiles of that many latent pixels (plus the blended output);
    ``controlnets``: how many ControlNets guide it (their weights, and the residuals they hand on)."""
    settings, device = model.settings, model.device
    disabled = {n for n in ("flash", "mem_efficient", "math") if getattr(settings, f"disable_{n}")}
    scores = _materialises_scores(settings.attention, device, disabled)
    precision = model.computes_in  # the default autocast is float32 on CPUs without native bf16
    element = 4 if precision == "full" else 2
    unet, vae = model.geometry.unet, model.geometry.vae
    weights = tensor_bytes(model.geometry.net) + controlnets * _controlnet_bytes(unet)
    if precision != "full":
        weights += weights // 2  # autocast caches a half-precision copy of every weight it casts
    f = model.geometry.vae_factor
    tokens = (height // f) * (width // f)
    unet_bytes = _unet_step(unet, tokens, batch * (2 if guided else 1), element, scores, controlled=controlnets > 0)
    if tile:
        side = tile * f
        per_image = _decoder_image(vae, min(side, height), min(side, width), element, scores) + 2 * 4 * 4 * height * width
    else:
        per_image = _decoder_image(vae, height, width, element, scores)
    return MemoryEstimate(weights, unet_bytes, min(slice_size, batch) * per_image)


DEFAULT_TILE = 64  # latent pixels per decoder tile when tiling is needed


def check_fits(pipeline, guided: bool) -> MemoryEstimate:
    """Refuse a run whose estimate exceeds the memory available, naming what would fit; when only
    the decoder is too large, decode in tiles (``pipeline.vae_tile_size``) instead."""
    model, height, width, batch = pipeline.model, pipeline.height, pipeline.width, pipeline.n_samples
    slice_size, tile = pipeline.vae_slice_size, pipeline.vae_tile_size
    controller = getattr(pipeline, "controller", None)
    controlnets = len(controller.settings) if controller is not None else 0

    def run(h: int, w: int, b: int, slices: int, tiles: int | None) -> MemoryEstimate:
        return estimate(model, h, w, b, guided, slices, tiles, controlnets)

    need = run(height, width, batch, slice_size, tile)
    have = available_memory(model.device)
    if os.environ.get("LDM_MEMORY_CHECK", "1") == "0" or have is None:
        return need
    if need.total > have and not tile:
        tiled = run(height, width, batch, 1, DEFAULT_TILE)
        if tiled.total <= have:
            logger.warning("decoding %dx%d images whole needs %s of %.1f GiB available: decoding one at a time in tiles "
                           "of %d latent pixels (see docs/memory.md)", width, height, need.describe(), have / GIB, DEFAULT_TILE)
            pipeline.vae_slice_size, pipeline.vae_tile_size = 1, DEFAULT_TILE
            return tiled
    if need.total <= have:
        logger.info("memory: the run needs %s of %.1f GiB available", need.describe(), have / GIB)
        return need
    fits_batch = next((b for b in range(batch - 1, 0, -1)
                       if run(height, width, b, 1, DEFAULT_TILE).total <= have), None)
    if fits_batch:
        hint = f"--n_samples {fits_batch} fits at {width}x{height}"
    else:
        m = model.geometry.multiple
        side = m
        while side * 2 <= max(height, width) and run(side * 2, side * 2, 1, 1, DEFAULT_TILE).total <= have:
            side *= 2
        while run(side + m, side + m, 1, 1, DEFAULT_TILE).total <= have and side + m <= max(height, width):
            side += m
        fits = run(side, side, 1, 1, DEFAULT_TILE).total <= have
        hint = f"the largest square image that fits at --n_samples 1 is {side}x{side}" if fits else "not even the smallest image fits"
    raise GenerationError(
        f"{width}x{height} at --n_samples {batch} needs {need.describe()} on {model.device.type}, but only "
        f"{have / GIB:.1f} GiB is available: {hint} (set LDM_MEMORY_CHECK=0 to run anyway)"
    )
