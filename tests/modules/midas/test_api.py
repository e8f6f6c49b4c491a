"""MiDaSInference (ldm/modules/midas/api.py): the original demo's input transform, the depth
output, construction without files, and load_midas (the ControlNet depth preprocessor's estimator)
from either file that holds it, strictly, including the real depth checkpoint's layout.

The transform is checked piecewise against its published definitions: the sizes against the
original ``Resize(384, 384, keep_aspect_ratio=True, ensure_multiple_of=32, resize_method="minimal")``
worked by hand, the resampling against OpenCV's INTER_CUBIC (Keys cubic convolution, a = -0.75,
pixel centres aligned, borders replicated) written out in float64. Tolerance 1e-6 relative:
float32 rounding of the input and the result (the resampling itself runs in float64); observed
~6e-8. OpenCV itself is not a test dependency; measured once against opencv-python-headless 5.0
(``cv2.resize(..., INTER_CUBIC)`` in the original transform, 512x512, 512x768, 256x320, 600x800):
relative error ~1.7e-7, max |difference| 4.8e-7.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from conftest import CONFIGS, family_keys, rel_err, tiny_family_config
from ldm.checkpoint import CheckpointError, save_state_dict
from ldm.loading import build_model
from ldm.modules.midas.api import MiDaSInference, load_midas, midas_from_state, midas_input_size


@pytest.mark.parametrize(
    "size, expected",
    [
        ((512, 512), (384, 384)),  # the usual 512 image: scale 0.75
        ((512, 768), (384, 576)),  # the side nearer its target sets the scale
        ((768, 512), (576, 384)),
        ((600, 800), (384, 512)),  # 0.64 is nearer 1 than 0.48
        ((256, 320), (320, 384)),  # upscaling: 1.2 (width) beats 1.5; 307.2 rounds to 320
        ((384, 384), (384, 384)),
        ((1000, 1000), (384, 384)),
    ],
)
def test_input_size_follows_the_original_minimal_resize(size, expected):
    assert midas_input_size(*size) == expected


def opencv_cubic_matrix(n_in: int, n_out: int, a: float = -0.75) -> np.ndarray:
    """The (n_out, n_in) resampling matrix of OpenCV's INTER_CUBIC along one axis."""
    m = np.zeros((n_out, n_in))
    scale = n_in / n_out
    for i in range(n_out):
        src = (i + 0.5) * scale - 0.5
        x0 = math.floor(src)
        t = src - x0
        w = [
            ((a * (t + 1) - 5 * a) * (t + 1) + 8 * a) * (t + 1) - 4 * a,
            ((a + 2) * t - (a + 3)) * t * t + 1,
            ((a + 2) * (1 - t) - (a + 3)) * (1 - t) * (1 - t) + 1,
        ]
        w.append(1 - sum(w))
        for k, weight in enumerate(w):
            m[i, min(max(x0 - 1 + k, 0), n_in - 1)] += weight
    return m


def test_prepare_resizes_bicubically_as_opencv_and_normalises():
    image = torch.rand(2, 3, 512, 768, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.device("meta"):
        midas = MiDaSInference()
    ours = midas.prepare(image)
    x = (image.double().numpy() + 1) * 0.5
    rows, cols = opencv_cubic_matrix(512, 384), opencv_cubic_matrix(768, 576)
    ref = torch.from_numpy((rows @ x @ cols.T - 0.5) / 0.5).float()
    assert ours.shape == (2, 3, 384, 576) and ours.dtype == torch.float32
    assert rel_err(ours, ref) <= 1e-6


def test_prepare_keeps_an_image_of_the_network_size():
    image = torch.rand(1, 3, 384, 384) * 2 - 1
    with torch.device("meta"):
        midas = MiDaSInference()
    assert torch.allclose(midas.prepare(image), image, atol=1e-6)


def test_depth_is_one_channel_at_the_input_size(tiny_depth_model):
    midas = tiny_depth_model.depth_model
    x = midas.prepare(torch.rand(2, 3, 96, 96) * 2 - 1)
    assert x.shape == (2, 3, 64, 64)
    depth = midas(x)
    assert depth.shape == (2, 1, 64, 64) and not depth.requires_grad
    assert torch.equal(depth[:, 0], midas.model(x))


def test_depth_runs_in_the_weights_dtype(tiny_depth_model):
    midas = tiny_depth_model.depth_model
    x = midas.prepare(torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1)
    half = copy.deepcopy(midas).to(torch.bfloat16)
    out = half(x)
    assert out.dtype == torch.bfloat16
    assert rel_err(out.float(), midas(x)) < 0.1  # bfloat16 rounding through the network (observed ~0.035)


def test_construction_reads_no_file(monkeypatch):
    """The original loaded midas_models/dpt_hybrid-midas-501f0c75.pt when built; the weights come
    from the SD2 checkpoint here."""
    def refuse(*args, **kwargs):
        raise AssertionError("a file was read")

    monkeypatch.setattr(torch, "load", refuse)
    model = build_model(CONFIGS / "v2-midas-inference.yaml", "meta")
    assert isinstance(model.depth_model, MiDaSInference)


def test_other_midas_types_are_refused():
    with pytest.raises(ValueError, match="dpt_hybrid"):
        MiDaSInference("dpt_large")


# -- load_midas: the depth preprocessor's estimator, read from either file that holds it


def test_load_midas_reads_the_depth_checkpoint_or_midas_own_file(tiny_depth_model, tmp_path):
    """The depth checkpoint (its depth_model.*, the UNet and the rest ignored) and MiDaS's own file
    (no prefix) give the same network, equal to the depth model's, in float32."""

    sizes = tiny_family_config("depth").model.params.depth_stage_config.params
    whole = tiny_depth_model.state_dict()
    save_state_dict({k: v.half() for k, v in whole.items()}, tmp_path / "depth.safetensors")
    save_state_dict(tiny_depth_model.depth_model.model.state_dict(), tmp_path / "dpt_hybrid.pt")
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    expected = tiny_depth_model.depth_model(x)
    for name, tolerance in [("depth.safetensors", 1e-2), ("dpt_hybrid.pt", 0.0)]:
        net = load_midas(tmp_path / name, sizes)
        assert next(net.parameters()).dtype == torch.float32
        assert rel_err(net(x), expected) <= tolerance  # half-precision weights: 1e-2


def test_load_midas_fits_the_real_depth_checkpoint():
    """Every depth_model.* tensor of the real 512-depth-ema layout, and nothing else, fills the default DPT-Hybrid."""

    state = {k: torch.empty(shape, device="meta") for k, shape in family_keys("depth").items()}
    net = midas_from_state(state)
    midas = {k for k in state if k.startswith("depth_model.model.")}
    assert len(midas) == len(net.model.state_dict()) == 368


def test_load_midas_explains_a_wrong_file(tiny_depth_model, tmp_path):

    save_state_dict({"model.diffusion_model.out.2.bias": torch.zeros(4)}, tmp_path / "base.safetensors")
    with pytest.raises(CheckpointError, match="base.safetensors: it holds no MiDaS depth model: give the SD2 depth checkpoint"):
        load_midas(tmp_path / "base.safetensors")
    save_state_dict(tiny_depth_model.state_dict(), tmp_path / "tiny-depth.safetensors")
    with pytest.raises(CheckpointError, match="does not fit DPT-Hybrid of these sizes .*depth_stage_config"):
        load_midas(tmp_path / "tiny-depth.safetensors")  # the full-size DPT-Hybrid
