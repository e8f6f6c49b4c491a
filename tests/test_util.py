"""``ldm.util``: config instantiation as in the original code, and the loader re-export."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from ldm import checkpoint
from ldm.util import get_obj_from_str, instantiate_from_config, load_state_dict


def test_get_obj_from_str():
    assert get_obj_from_str("torch.nn.Linear") is torch.nn.Linear
    assert get_obj_from_str("ldm.util.instantiate_from_config") is instantiate_from_config
    with pytest.raises(AttributeError):
        get_obj_from_str("torch.nn.NoSuchLayer")
    with pytest.raises(ModuleNotFoundError):
        get_obj_from_str("no_such_package.Thing")


def test_instantiate_from_omegaconf_with_params_and_extras():
    cfg = OmegaConf.create({"target": "torch.nn.Linear", "params": {"in_features": 3, "out_features": 2}})
    layer = instantiate_from_config(cfg, bias=False)
    assert isinstance(layer, torch.nn.Linear) and layer.weight.shape == (2, 3) and layer.bias is None


def test_instantiate_without_params():
    assert isinstance(instantiate_from_config({"target": "torch.nn.Identity"}), torch.nn.Identity)
    assert isinstance(instantiate_from_config({"target": "torch.nn.Identity", "params": None}), torch.nn.Identity)


def test_special_strings_of_the_original():
    assert instantiate_from_config("__is_first_stage__") is None
    assert instantiate_from_config("__is_unconditional__") is None
    with pytest.raises(KeyError, match="target"):
        instantiate_from_config({"params": {}})


def test_load_state_dict_is_the_checkpoint_loader():
    assert load_state_dict is checkpoint.load_state_dict
