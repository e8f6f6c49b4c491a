"""Synthetic coloured shapes captioned "a {colour} {shape}": the demo model's training data.

Sample ``i`` of a data set with seed ``s`` is drawn from its own generator seeded with
``(s, i)``, so every sample is reproducible on its own, in any order, in any worker.
Shapes are drawn at 4x resolution and box-filtered down, which anti-aliases their edges.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

logger = logging.getLogger(__name__)

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 180, 40),
    "blue": (30, 60, 220),
    "yellow": (235, 215, 30),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
BACKGROUND: tuple[int, int, int] = (255, 255, 255)
_SUPERSAMPLE = 4


def caption(colour: str, shape: str) -> str:
    return f"a {colour} {shape}"


def draw_shape(
    shape: str, colour: Sequence[int], size: int, extent: float, centre: tuple[float, float]
) -> Image.Image:
    """A ``size``-pixel RGB image: one ``shape`` of bounding-box side ``extent`` pixels centred
    at ``centre`` (pixels), in ``colour`` on the plain background.

    The triangle points up and fills half its bounding box; the circle pi/4; the square all.
    """
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose from {SHAPES}")
    s = _SUPERSAMPLE
    img = Image.new("RGB", (size * s, size * s), BACKGROUND)
    draw = ImageDraw.Draw(img)
    cx, cy, r = centre[0] * s, centre[1] * s, extent * s / 2
    box = (cx - r, cy - r, cx + r, cy + r)
    fill = tuple(int(c) for c in colour)
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)
    return img.resize((size, size), Image.BOX)


def to_tensor(img: Image.Image) -> torch.Tensor:
    """An RGB image as a float tensor (3, H, W) in [-1, 1], the range the autoencoder works in."""
    a = torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32))
    return (a / 127.5 - 1.0).permute(2, 0, 1).contiguous()


class ShapesDataset(Dataset):
    """``num_samples`` images of ``size`` pixels, each ``{"image": (3, H, W) in [-1, 1],
    "caption": str, "index": int}`` (the index lets a trainer cache per-sample work).

    Colours and shapes cycle so every combination is equally frequent; the extent
    (``min_extent`` to ``max_extent`` of the image side) and the position are random.
    """

    def __init__(
        self,
        num_samples: int = 12000,
        size: int = 32,
        seed: int = 0,
        min_extent: float = 0.35,
        max_extent: float = 0.7,
        colours: Sequence[str] | None = None,
        shapes: Sequence[str] | None = None,
    ):
        if num_samples < 1:
            raise ValueError(f"num_samples must be at least 1, got {num_samples}")
        if size < 8:
            raise ValueError(f"size must be at least 8 pixels, got {size}")
        if not 0.0 < min_extent <= max_extent <= 1.0:
            raise ValueError(f"need 0 < min_extent <= max_extent <= 1, got {min_extent}, {max_extent}")
        self.colours = list(colours or COLOURS)
        self.shapes = list(shapes or SHAPES)
        unknown = [c for c in self.colours if c not in COLOURS] + [s for s in self.shapes if s not in SHAPES]
        if unknown:
            raise ValueError(f"unknown colours/shapes {unknown}; known: {list(COLOURS)}, {list(SHAPES)}")
        self.num_samples = num_samples
        self.size = size
        self.seed = seed
        self.min_extent, self.max_extent = min_extent, max_extent

    def __len__(self) -> int:
        return self.num_samples

    def describe(self, index: int) -> dict:
        """The parameters of sample ``index``: colour, shape, extent and centre in pixels."""
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} samples")
        rng = np.random.default_rng([self.seed, index])
        combo = index % (len(self.colours) * len(self.shapes))
        colour, shape = self.colours[combo % len(self.colours)], self.shapes[combo // len(self.colours)]
        extent = rng.uniform(self.min_extent, self.max_extent) * self.size
        margin = extent / 2 + 1
        cx, cy = rng.uniform(margin, self.size - margin, size=2)
        return {"colour": colour, "shape": shape, "extent": float(extent), "centre": (float(cx), float(cy))}

    def image(self, index: int) -> Image.Image:
        d = self.describe(index)
        return draw_shape(d["shape"], COLOURS[d["colour"]], self.size, d["extent"], d["centre"])

    def __getitem__(self, index: int) -> dict:
        d = self.describe(index)
        img = draw_shape(d["shape"], COLOURS[d["colour"]], self.size, d["extent"], d["centre"])
        return {"image": to_tensor(img), "caption": caption(d["colour"], d["shape"]), "index": index}


def write_folder(dataset: ShapesDataset, out: str | Path) -> Path:
    """Write the data set as ``NNNNNN.png`` + ``NNNNNN.txt`` pairs into a new folder ``out``."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; choose a new folder")
    out.mkdir(parents=True, exist_ok=True)
    for i in range(len(dataset)):
        d = dataset.describe(i)
        dataset.image(i).save(out / f"{i:06d}.png")
        (out / f"{i:06d}.txt").write_text(caption(d["colour"], d["shape"]) + "\n")
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the synthetic shapes data set to a folder of PNG + TXT pairs.")
    parser.add_argument("--out", required=True, help="new (or empty) folder to write into")
    parser.add_argument("--n", type=int, default=1000, help="number of samples")
    parser.add_argument("--size", type=int, default=32, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = write_folder(ShapesDataset(args.n, args.size, args.seed), args.out)
    print(f"wrote {args.n} samples to {out}")


if __name__ == "__main__":
    main()
