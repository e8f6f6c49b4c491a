"""ldm/generation/tiling.py: tiles cover the image exactly once in weight, a pointwise decoder is
reproduced exactly, and the real (tiny) decoder tiled stays close to the untiled one."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import rel_err
from ldm.generation.tiling import decode_tiled


def upsample(z: torch.Tensor) -> torch.Tensor:
    """A decoder without spatial context: each output pixel depends on one latent pixel."""
    return F.interpolate(torch.tanh(z[:, :3]), scale_factor=4, mode="nearest")


@pytest.mark.parametrize("shape, tile, overlap", [((1, 4, 37, 50), 16, 4), ((2, 4, 16, 16), 16, 4), ((1, 4, 40, 9), 12, 0)])
def test_pointwise_decoder_is_reproduced_exactly(shape, tile, overlap):
    z = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(decode_tiled(upsample, z, 4, tile, overlap), upsample(z), rtol=1e-6, atol=1e-6)


def test_tiny_decoder_tiled_is_close_to_untiled(tiny_eps_model):
    """Tiles see less context (GroupNorm statistics per tile, 3x3 receptive fields at the seams):
    the tiny random decoder's tiled output stays within 10% (relative L2) of the whole decode."""
    z = torch.randn(1, 4, 24, 24, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        whole = tiny_eps_model.decode_first_stage(z)
        tiled = decode_tiled(tiny_eps_model.decode_first_stage, z, 8, tile=16, overlap=4)
    assert tiled.shape == whole.shape
    assert rel_err(tiled, whole) < 0.1


def test_overlap_must_be_smaller_than_the_tile():
    with pytest.raises(ValueError, match="overlap"):
        decode_tiled(upsample, torch.zeros(1, 4, 8, 8), 4, tile=8, overlap=8)
