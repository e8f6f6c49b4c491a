"""A folder of image + caption pairs (``NAME.png`` with ``NAME.txt``), as training data.

``python -m ldm.data.shapes --out DIR`` writes the synthetic shapes in this layout.
"""

from __future__ import annotations

import os
from pathlib import Path

from PIL import Image
from torch.utils.data import Dataset

from ldm.data.shapes import to_tensor

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


class ImageCaptionFolder(Dataset):
    """Items ``{"image": (3, size, size) in [-1, 1], "caption": str, "index": int}``.

    Every image needs a caption file of the same name; images must be ``size`` pixels
    square (no silent resizing: a wrong folder should fail, not train on distorted data).
    """

    def __init__(self, root: str | os.PathLike, size: int):
        self.root = Path(root)
        if not self.root.exists():
            raise FileNotFoundError(f"data folder not found: {self.root}")
        if not self.root.is_dir():
            raise NotADirectoryError(f"data folder is not a folder: {self.root}")
        self.images = sorted(p for p in self.root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.images:
            raise ValueError(f"data folder {self.root} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        orphans = [p.name for p in self.images if not p.with_suffix(".txt").is_file()]
        if orphans:
            raise ValueError(f"data folder {self.root}: {len(orphans)} image(s) without a caption .txt, e.g. {orphans[:3]}")
        self.size = size
        with Image.open(self.images[0]) as first:
            if first.size != (size, size):
                raise ValueError(
                    f"data folder {self.root}: {self.images[0].name} is {first.size[0]}x{first.size[1]}, "
                    f"the config expects {size}x{size}"
                )

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        path = self.images[index]
        with Image.open(path) as img:
            if img.size != (self.size, self.size):
                raise ValueError(f"{path} is {img.size[0]}x{img.size[1]}, expected {self.size}x{self.size}")
            image = to_tensor(img)
        return {"image": image, "caption": path.with_suffix(".txt").read_text().strip(), "index": index}
