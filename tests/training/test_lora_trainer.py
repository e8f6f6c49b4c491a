"""LoRA fine-tuning (ldm.training.lora) end to end through main.py on the tiny model: only the
low-rank weights learn, the export is a kohya-format file, and that file, merged by --lora's code
and by diffusers' load_lora_weights + fuse_lora, gives the trained network's own outputs.

Tolerance (relative error, L2): 1e-5, float32 rounding of W x + s up(down(x)) against
(W + s up down) x (observed ~1e-7).
"""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

import main
from conftest import diffusers_pipeline_twin, rel_err, tiny_config, tiny_model
from ldm.checkpoint import load_state_dict, save_state_dict
from ldm.lora import merge_loras
from ldm.training.lora import LoraTrainer


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lora-train")
    base = tiny_model("eps", seed=9)
    save_state_dict(base.state_dict(), folder / "base.safetensors")
    config = {
        "seed": 2,
        "model": {"target": "ldm.training.lora.LoraTrainer",
                  "params": {"ldm_config": tiny_config().model, "base_ckpt": str(folder / "base.safetensors"), "rank": 2,
                             "alpha": 1.0, "learning_rate": 5e-2}},
        "data": {"target": "ldm.data.shapes.ShapesDataset",
                 "params": {"num_samples": 8, "size": 64, "min_extent": 0.75, "max_extent": 0.9}, "batch_size": 4},
        "lightning": {"checkpoint_every_n_steps": 10, "trainer": {"max_steps": 3, "log_every_n_steps": 1, "enable_progress_bar": False}},
    }
    OmegaConf.save(OmegaConf.create(config), folder / "lora.yaml")
    assert main.main(["--base", str(folder / "lora.yaml"), "--logdir", str(folder / "run")]) == 0
    ckpt = torch.load(folder / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    return {"base": base, "lora": folder / "run" / "model.safetensors", "state": ckpt["state_dict"], "config": config}


def test_only_the_low_rank_weights_learn_and_the_export_is_kohya(run):
    exported = load_state_dict(run["lora"])
    names = {k.rsplit(".", 2)[0] for k in exported}
    assert all(n.startswith("lora_unet_") and n.endswith(("to_q", "to_k", "to_v", "to_out_0")) for n in names) and names
    assert all(exported[f"{n}.lora_down.weight"].shape[0] == 2 and float(exported[f"{n}.alpha"]) == 1.0 for n in names)
    assert any(exported[f"{n}.lora_up.weight"].abs().max() > 0 for n in names)  # up started at zero and moved
    base = run["base"].state_dict()
    trained = {k.removeprefix("model."): v for k, v in run["state"].items()}
    for key, value in base.items():  # the base weights are where they started (a wrapped layer's under .base)
        wrapped = key.replace(".weight", ".base.weight").replace(".bias", ".base.bias")
        assert torch.equal(trained.get(key, trained.get(wrapped)), value), key


def test_the_exported_file_gives_the_trained_networks_outputs(run):
    trainer = LoraTrainer(tiny_config().model, str(run["lora"].parent.parent / "base.safetensors"), rank=2, alpha=1.0)
    trainer.load_state_dict(run["state"])
    gen = torch.Generator().manual_seed(0)
    x, t, c = torch.randn(2, 4, 8, 8, generator=gen), torch.tensor([999, 300]), torch.randn(2, 77, 48, generator=gen)
    with torch.no_grad():
        trained = trainer.model.model.diffusion_model(x, t, context=c)
    model = tiny_model("eps", seed=9)
    pipe = diffusers_pipeline_twin(tiny_config(), model)
    merge_loras(model, [(run["lora"], 1.0)])
    pipe.load_lora_weights(load_state_dict(run["lora"]))
    pipe.fuse_lora()
    with torch.no_grad():
        ours = model.model.diffusion_model(x, t, context=c)
        theirs = pipe.unet(x, t, c).sample
        plain = tiny_model("eps", seed=9).model.diffusion_model(x, t, context=c)
    assert rel_err(trained, plain) > 1e-4  # three steps changed it
    assert rel_err(ours, trained) <= 1e-5 and rel_err(theirs, trained) <= 1e-5
