"""The synthetic shapes data set: deterministic, captions that match the pixels, and the
fill-ratio measure the demo-model test relies on, checked on the ground truth."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import fill_ratio, shape_mask
from ldm.data.folder import ImageCaptionFolder
from ldm.data.shapes import COLOURS, SHAPES, ShapesDataset, draw_shape, write_folder

# What tests/test_demo.py measures on generated images, checked here on drawn ones.
EXPECTED_FILL = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5}


def test_samples_are_deterministic_and_seed_dependent():
    a, b, c = ShapesDataset(8, seed=3), ShapesDataset(8, seed=3), ShapesDataset(8, seed=4)
    for i in range(8):
        assert torch.equal(a[i]["image"], b[i]["image"]) and a[i]["caption"] == b[i]["caption"]
    assert any(not torch.equal(a[i]["image"], c[i]["image"]) for i in range(8))


def test_items_are_normalised_images_with_captions_and_indices():
    item = ShapesDataset(4, size=32)[2]
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
    assert -1.0 <= item["image"].min() < item["image"].max() <= 1.0
    assert item["index"] == 2
    colour, shape = item["caption"].removeprefix("a ").split()
    assert colour in COLOURS and shape in SHAPES


def test_every_colour_and_shape_is_equally_frequent():
    captions = [ShapesDataset(24)[i]["caption"] for i in range(24)]
    assert len(set(captions)) == len(COLOURS) * len(SHAPES) == 12
    assert all(captions.count(c) == 2 for c in set(captions))


def test_pixels_match_the_caption():
    """The named colour dominates the shape's pixels; the fill ratio names the shape."""
    data = ShapesDataset(48, size=32, seed=5)
    for i in range(len(data)):
        d = data.describe(i)
        image = np.asarray(data.image(i)).astype(int)
        mask = shape_mask(image)
        rgb = image[mask].mean(0)
        if d["colour"] != "yellow":
            assert int(rgb.argmax()) == ["red", "green", "blue"].index(d["colour"])
        else:
            assert min(rgb[0], rgb[1]) > rgb[2] + 100
        assert abs(fill_ratio(mask) - EXPECTED_FILL[d["shape"]]) < 0.15, d


def test_positions_and_sizes_vary_and_stay_inside():
    data = ShapesDataset(40, size=32)
    described = [data.describe(i) for i in range(40)]
    extents = [d["extent"] for d in described]
    centres = [d["centre"] for d in described]
    assert max(extents) - min(extents) > 5 and len({(round(x), round(y)) for x, y in centres}) > 20
    for d in described:
        r = d["extent"] / 2
        assert all(r <= c <= 32 - r for c in d["centre"])


@pytest.mark.parametrize(
    "kwargs, match",
    [({"num_samples": 0}, "num_samples"), ({"size": 4}, "size"), ({"min_extent": 0.9, "max_extent": 0.5}, "extent"),
     ({"colours": ["purple"]}, "purple")],
)
def test_bad_parameters_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ShapesDataset(**kwargs)


def test_unknown_shape_is_refused():
    with pytest.raises(ValueError, match="hexagon"):
        draw_shape("hexagon", (0, 0, 0), 32, 10, (16, 16))


def test_folder_round_trip(tmp_path):
    data = ShapesDataset(6, size=16, seed=2)
    folder = write_folder(data, tmp_path / "shapes")
    loaded = ImageCaptionFolder(folder, size=16)
    assert len(loaded) == 6
    for i in range(6):
        assert loaded[i]["caption"] == data[i]["caption"]
        assert torch.allclose(loaded[i]["image"], data[i]["image"])  # PNG is lossless
    with pytest.raises(FileExistsError, match="not empty"):
        write_folder(data, folder)


def test_folder_errors_are_specific(tmp_path):
    with pytest.raises(FileNotFoundError, match="data folder not found"):
        ImageCaptionFolder(tmp_path / "nope", size=16)
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError):
        ImageCaptionFolder(tmp_path / "file", size=16)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        ImageCaptionFolder(tmp_path / "empty", size=16)
    folder = write_folder(ShapesDataset(3, size=16), tmp_path / "data")
    with pytest.raises(ValueError, match="expects 32x32"):
        ImageCaptionFolder(folder, size=32)
    (folder / "000001.txt").unlink()
    with pytest.raises(ValueError, match="without a caption"):
        ImageCaptionFolder(folder, size=16)
