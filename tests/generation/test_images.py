"""ldm/generation/images.py: the init image, file numbering, the grid, the watermark."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ldm.generation import images
from ldm.generation.errors import GenerationError


def test_init_image_is_cut_to_the_multiple_and_scaled(tmp_path):
    from PIL import Image

    path = tmp_path / "init.png"
    Image.fromarray(np.full((70, 90, 3), 255, np.uint8)).save(path)
    image = images.load_init_image(str(path), 16)
    assert image.shape == (1, 3, 64, 80) and torch.allclose(image, torch.ones(()))
    with pytest.raises(GenerationError, match="too small"):
        images.load_init_image(str(path), 128)


def test_next_number_follows_what_is_there(tmp_path):
    assert images.next_number(tmp_path, images.SAMPLE_NAME) == 0
    for name in ("00003.png", "00010.png", "grid-0004.png", "notes.txt", ".00011.png.x.tmp"):
        (tmp_path / name).touch()
    assert images.next_number(tmp_path, images.SAMPLE_NAME) == 11
    assert images.next_number(tmp_path, images.GRID_NAME) == 5


@pytest.mark.parametrize("n, nrow", [(1, 3), (4, 2), (5, 3), (3, 8)])
def test_make_grid_matches_torchvision(n, nrow):
    utils = pytest.importorskip("torchvision.utils")
    batch = torch.rand(n, 3, 8, 12)
    arrays = [images.to_uint8(x) for x in batch]
    expected = (255.0 * utils.make_grid(batch, nrow=nrow).numpy().transpose(1, 2, 0)).astype(np.uint8)
    # Exact: torchvision only copies the pixels; both sides convert them with the same NumPy code.
    np.testing.assert_array_equal(images.make_grid(arrays, nrow), expected)


def test_watermark_is_readable_and_small_images_are_left_alone(caplog):
    imwatermark = pytest.importorskip("imwatermark")
    marker = images.Watermarker(enabled=True)
    image = (np.random.RandomState(0).rand(256, 256, 3) * 255).astype(np.uint8)
    marked = marker(image)
    assert marked.shape == image.shape and not np.array_equal(marked, image)
    decoder = imwatermark.WatermarkDecoder("bytes", 8 * len(images.WATERMARK))
    assert decoder.decode(np.ascontiguousarray(marked[:, :, ::-1]), "dwtDct") == images.WATERMARK.encode()
    small = image[:64, :64]
    assert marker(small) is small and "cannot carry the invisible watermark" in caplog.text
    assert images.Watermarker(enabled=False)(image) is image
