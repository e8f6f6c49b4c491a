"""The MiDaS DPT-Hybrid network (ldm/modules/midas/dpt.py) against transformers'
DPTForDepthEstimation in its hybrid form (``DPTConfig(is_hybrid=True)``: BiT ResNet + ViT),
holding the same random weights through the key mapping written in tests/conftest.py
(``midas_to_transformers``).

Tolerances: the two implementations run the same float32 operations (weight-standardised
'SAME' convolutions, GroupNorm, 12 ViT blocks, the DPT neck and head) and agree to float32
rounding of differently fused kernels: relative error (L2) <= 1e-5; observed 0 on this CPU.
A perturbation of a single weight by 1e-3 shows up at ~2e-5, so the comparison is sensitive.
The layout of the full-size backbone is compared with timm's registered model, exactly.
"""

from __future__ import annotations

import pytest
import torch

from conftest import rel_err

RTOL = 1e-5


@pytest.fixture(scope="module")
def dpt(tiny_depth_model):
    return tiny_depth_model.depth_model.model


def test_dpt_hybrid_matches_transformers(dpt, transformers_dpt):
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        ours = dpt(x)
        ref = transformers_dpt(pixel_values=x, output_hidden_states=True).predicted_depth
    assert ours.shape == ref.shape == (2, 64, 64)
    # The head ends in a ReLU: the comparison is meaningful only if most pixels pass it.
    assert ref.abs().mean() > 0.1 and 0.5 < (ref > 0).float().mean() < 1.0
    assert rel_err(ours, ref) <= RTOL


def test_position_embedding_is_resized_as_transformers_does(dpt, transformers_dpt):
    """Inputs of another size (non-square images) use the trained position embedding, resized bilinearly."""
    pos = dpt.pretrained.model.pos_embed
    with torch.no_grad():
        assert dpt.pretrained.position_embedding((4, 4)) is pos
        ref = transformers_dpt.dpt.embeddings._resize_pos_embed(pos, 6, 4)
        assert rel_err(dpt.pretrained.position_embedding((6, 4)), ref) <= RTOL
        assert dpt(torch.zeros(1, 3, 96, 64)).shape == (1, 96, 64)


@pytest.mark.filterwarnings("ignore:Mapping deprecated model name")
def test_full_size_backbone_is_timms_vit_base_resnet50_384():
    """The original built ``timm.create_model("vit_base_resnet50_384")``; ours is the same
    network, tensor for tensor, built from timm's parts so that the tests can shrink it."""
    import timm

    from ldm.modules.midas.dpt import hybrid_vit

    with torch.device("meta"):
        ours = hybrid_vit().state_dict()
        ref = timm.create_model("vit_base_resnet50_384", pretrained=False).state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in ref.items()}
