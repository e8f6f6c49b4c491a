"""Image files: the init image read in, numbered watermarked PNGs with metadata and the grid written out."""

from __future__ import annotations

import logging
import math
import os
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image, PngImagePlugin

from ldm.fileio import atomic_path
from ldm.generation.errors import GenerationError

logger = logging.getLogger(__name__)

WATERMARK = "SDV2"
WATERMARK_MIN_PIXELS = 256 * 256  # imwatermark refuses smaller images
SAMPLE_NAME = re.compile(r"^(\d{5,})\.png$")
GRID_NAME = re.compile(r"^grid-(\d{4,})\.png$")


def load_init_image(path: str, multiple: int, flag: str = "--init-img") -> torch.Tensor:
    """The image as a (1, 3, h, w) tensor in [-1, 1], sides cut down to multiples of ``multiple``
    and resized with Lanczos, as the original img2img does (with 64 for SD2)."""
    image = open_image(path, flag, "RGB")
    w, h = image.size
    new_w, new_h = w - w % multiple, h - h % multiple
    if not new_w or not new_h:
        raise GenerationError(f"{flag} {path}: {w}x{h} is too small, sides must be at least {multiple} pixels")
    if (new_w, new_h) != (w, h):
        logger.info("init image %dx%d resized to %dx%d (sides must be multiples of %d)", w, h, new_w, new_h, multiple)
    image = image.resize((new_w, new_h), resample=Image.LANCZOS)
    array = np.asarray(image).astype(np.float32) / 255.0
    return 2.0 * torch.from_numpy(array[None].transpose(0, 3, 1, 2).copy()) - 1.0


def open_image(path: str | Path, flag: str, mode: str) -> Image.Image:
    """The image at ``path`` in ``mode`` ("keep": as stored), or a GenerationError naming ``flag``."""
    try:
        with Image.open(path) as image:
            image.load()
            return image if mode == "keep" else image.convert(mode)
    except FileNotFoundError:
        raise GenerationError(f"{flag} {path}: no such file") from None
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise GenerationError(f"{flag} {path}: cannot be read as an image: {e}") from None


DEMO_PAD = 64  # the original demos pad every input to multiples of 64


def demo_padding(required: int) -> int:
    """The multiple the demos pad to (64), or a multiple of it that the model also requires."""
    return math.lcm(DEMO_PAD, required)


def pad_to_multiple(array: np.ndarray, multiple: int) -> np.ndarray:
    """Pad (h, w[, c]) on the bottom and right by repeating the edge, up to multiples of ``multiple``
    and at least twice it, as the original's inpainting, depth and upscaling demos do."""
    h, w = array.shape[:2]
    new_h, new_w = (max(2, -(-side // multiple)) * multiple for side in (h, w))
    pad = [(0, new_h - h), (0, new_w - w)] + [(0, 0)] * (array.ndim - 2)
    return np.pad(array, pad, mode="edge")


def load_padded_image(path: str | Path, multiple: int, flag: str) -> tuple[torch.Tensor, tuple[int, int]]:
    """The image as (1, 3, H, W) in [-1, 1], edge-padded to multiples of ``multiple`` (x / 127.5 - 1,
    as the demos), and its size before padding."""
    array = np.asarray(open_image(path, flag, "RGB"))
    padded = pad_to_multiple(array, multiple)
    image = torch.from_numpy(padded.transpose(2, 0, 1)[None].copy()).to(torch.float32) / 127.5 - 1.0
    return image, array.shape[:2]


def load_mask(path: str | Path, multiple: int, flag: str = "--mask") -> tuple[torch.Tensor, tuple[int, int]]:
    """A mask image as (1, 1, H, W) in [0, 1] (grey levels / 255; white = repaint), padded like the image."""
    array = np.asarray(open_image(path, flag, "L")).astype(np.float32) / 255.0
    return torch.from_numpy(pad_to_multiple(array, multiple)[None, None].copy()), array.shape[:2]


def load_depth_map(path: str | Path, flag: str = "--depth-map") -> torch.Tensor:
    """A depth image (8- or 16-bit greyscale; brighter = nearer, as MiDaS' inverse depth) as (1, 1, h, w) float32."""
    image = open_image(path, flag, "keep")
    if image.mode not in ("L", "I", "I;16", "I;16B", "F"):
        image = image.convert("L")
    array = np.asarray(image).astype(np.float32)
    if array.max() == array.min():
        raise GenerationError(f"{flag} {path}: the depth map is constant, so it says nothing about depth")
    return torch.from_numpy(array[None, None].copy())


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """(3, h, w) in [0, 1] to an (h, w, 3) uint8 array, truncating as the original does."""
    return (255.0 * image.numpy().transpose(1, 2, 0)).astype(np.uint8)


def make_grid(images: Sequence[np.ndarray], nrow: int, padding: int = 2) -> np.ndarray:
    """Images in rows of ``nrow`` with a black ``padding`` border, as torchvision's make_grid
    (which returns a single image unpadded)."""
    if len(images) == 1:
        return images[0]
    h, w, c = images[0].shape
    cols = min(nrow, len(images))
    rows = math.ceil(len(images) / cols)
    grid = np.zeros((rows * (h + padding) + padding, cols * (w + padding) + padding, c), dtype=np.uint8)
    for i, image in enumerate(images):
        y, x = (i // cols) * (h + padding) + padding, (i % cols) * (w + padding) + padding
        grid[y : y + h, x : x + w] = image
    return grid


class Watermarker:
    """The original's invisible watermark ("SDV2", dwtDct) via invisible-watermark, when installed."""

    def __init__(self, enabled: bool):
        self.encoder = None
        self._warned_small = False
        if not enabled:
            return
        try:
            from imwatermark import WatermarkEncoder
        except ImportError:
            logger.warning("invisible-watermark is not installed: images are not watermarked (pip install invisible-watermark)")
            return
        self.encoder = WatermarkEncoder()
        self.encoder.set_watermark("bytes", WATERMARK.encode("utf-8"))

    def __call__(self, array: np.ndarray) -> np.ndarray:
        if self.encoder is None:
            return array
        if array.shape[0] * array.shape[1] < WATERMARK_MIN_PIXELS:
            if not self._warned_small:
                logger.warning("images below 256x256 pixels cannot carry the invisible watermark: not watermarked")
                self._warned_small = True
            return array
        return encode_watermark(array, self.encoder)


def encode_watermark(array: np.ndarray, encoder: Any) -> np.ndarray:
    """An RGB uint8 ``array`` (H, W, 3) watermarked by an imwatermark ``WatermarkEncoder`` (which
    works on BGR images), with the original's method (dwtDct)."""
    bgr = np.ascontiguousarray(array[:, :, ::-1])
    return np.ascontiguousarray(encoder.encode(bgr, "dwtDct")[:, :, ::-1])


def next_number(folder: Path, pattern: re.Pattern) -> int:
    """One more than the highest number of the files of ``pattern`` in ``folder``."""
    numbers = [int(m.group(1)) for name in os.listdir(folder) if (m := pattern.match(name))]
    return max(numbers, default=-1) + 1


class ImageWriter:
    """Saves numbered PNGs with their generation parameters as text chunks, never overwriting.

    Folders are created at the first save, so a run that fails before it leaves nothing behind.
    """

    def __init__(self, outdir: Path, watermark: Watermarker, metadata: dict[str, str]):
        self.outdir = outdir
        self.sample_dir = outdir / "samples"
        self.watermark = watermark
        self.metadata = metadata
        self.saved: list[Path] = []
        self._next: dict[Path, int] = {}

    def _save(self, array: np.ndarray, folder: Path, pattern: re.Pattern, name: str, extra: dict[str, Any],
              number: int | None = None) -> Path:
        info = PngImagePlugin.PngInfo()
        for key, value in {**self.metadata, **extra}.items():
            info.add_text(key, str(value))
        image = Image.fromarray(self.watermark(array))
        if folder not in self._next:
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise GenerationError(f"--outdir {self.outdir}: cannot create {folder}: {e.strerror or e}") from None
            self._next[folder] = next_number(folder, pattern) if number is None else 0
        if number is not None:  # a job's global numbering: the name is fixed, taking another would collide
            path = folder / name.format(number)
            try:
                with atomic_path(path) as tmp:
                    image.save(tmp, format="PNG", pnginfo=info)
            except FileExistsError:
                raise GenerationError(f"{path} exists: another run is writing into {folder}; "
                                      "give each run its own --outdir") from None
            return path
        while True:
            path = folder / name.format(self._next[folder])
            self._next[folder] += 1
            try:
                with atomic_path(path) as tmp:
                    image.save(tmp, format="PNG", pnginfo=info)
                return path
            except FileExistsError:  # written by another run meanwhile: take the next number
                continue

    def sample(self, array: np.ndarray, number: int | None = None, **extra: Any) -> Path:
        """Save a sample as ``number`` (never over an existing file), or by default as the next free number."""
        path = self._save(array, self.sample_dir, SAMPLE_NAME, "{:05}.png", extra, number)
        self.saved.append(path)
        return path

    def grid(self, arrays: Sequence[np.ndarray], nrow: int, prompts: Sequence[str]) -> Path:
        prompt = "\n".join(dict.fromkeys(prompts))
        return self._save(make_grid(arrays, nrow), self.outdir, GRID_NAME, "grid-{:04}.png", {"prompt": prompt})
