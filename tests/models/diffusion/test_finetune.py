"""LatentFinetuneDiffusion (ldm/models/diffusion/finetune.py): the original's fine-tuning options
are accepted, fine-tuning itself is refused clearly."""

from __future__ import annotations

import pytest

from conftest import tiny_family_config
from ldm.loading import build_model


def test_training_only_options_are_accepted_and_recorded():
    config = tiny_family_config("inpainting")
    config.model.params.update(keep_finetune_dims=4, c_concat_log_start=1, c_concat_log_end=5)
    model = build_model(config, "meta")
    assert model.concat_keys == ("mask", "masked_image")
    assert model.training_options["finetune_keys"] is None
    assert model.training_options["c_concat_log_end"] == 5


def test_finetuning_from_a_text_to_image_checkpoint_is_refused(tmp_path):
    config = tiny_family_config("depth")
    del config.model.params["finetune_keys"]  # the original's default widens input_blocks.0.0.weight
    config.model.params.ckpt_path = str(tmp_path / "sd2-base.ckpt")
    with pytest.raises(NotImplementedError, match="finetune_keys: null"):
        build_model(config, "meta")


def test_unknown_parameters_are_still_refused():
    config = tiny_family_config("inpainting")
    config.model.params.finetune_keyz = None
    with pytest.raises(TypeError, match="finetune_keyz"):
        build_model(config, "meta")
