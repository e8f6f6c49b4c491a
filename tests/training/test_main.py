"""The training entry point end to end on tiny models: both stages train, write atomic
checkpoints, resume from them, export weights that load strictly; bad input fails clearly."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from safetensors import safe_open

import main
from conftest import ROOT, save_yaml, tiny_config, vae_training_config
from ldm.checkpoint import load_state_dict
from ldm.loading import load_model_from_config
from ldm.models.autoencoder import AutoencoderKL

DEMO_CONFIG = ROOT / "configs" / "demo" / "shapes-demo.yaml"  # an inference config


def ldm_config(first_stage: str) -> dict:
    config = vae_training_config()
    config["model"] = {
        "target": "ldm.training.diffusion.LatentDiffusionTrainer",
        "params": {"ldm_config": tiny_config().model, "first_stage_ckpt": first_stage, "ema_decay": 0.9},
    }
    return config


def step_of(ckpt) -> int:
    return torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"]


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vae")
    config = save_yaml(vae_training_config(), folder / "vae.yaml")
    assert main.main(["--base", config, "--logdir", str(folder / "run")]) == 0
    return {"config": config, "logdir": folder / "run"}


def test_autoencoder_stage_trains_checkpoints_and_exports(vae_run):
    logdir = vae_run["logdir"]
    assert step_of(logdir / "checkpoints" / "last.ckpt") == 3
    assert (logdir / "config.yaml").is_file() and list(logdir.glob("logs/*/metrics.csv"))
    vae = AutoencoderKL(**tiny_config().model.params.first_stage_config.params)
    vae.load_state_dict(load_state_dict(logdir / "model.safetensors"))  # strict
    with safe_open(logdir / "model.safetensors", "pt") as f:
        assert float(f.metadata()["latent_std"]) > 0
    assert not list((logdir / "checkpoints").glob("*.tmp")), "temporary files left behind"


def test_resume_continues_from_the_last_checkpoint(vae_run, tmp_path):
    logdir = vae_run["logdir"]
    before = load_state_dict(logdir / "model.safetensors")
    args = ["--base", vae_run["config"], "--logdir", str(logdir), "lightning.trainer.max_steps=5"]
    assert main.main(args) == 2, "an existing run must not be restarted without --resume"
    assert step_of(logdir / "checkpoints" / "last.ckpt") == 3
    assert main.main([*args, "--resume"]) == 0
    assert step_of(logdir / "checkpoints" / "last.ckpt") == 5
    after = load_state_dict(logdir / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_diffusion_stage_trains_with_ema_and_exports_inference_weights(vae_run, tmp_path):
    first_stage = str(vae_run["logdir"] / "model.safetensors")
    config = save_yaml(ldm_config(first_stage), tmp_path / "ldm.yaml")
    logdir = tmp_path / "run"
    export = tmp_path / "demo.safetensors"
    assert main.main(["--base", config, "--logdir", str(logdir), "--export", str(export)]) == 0
    assert main.main(["--base", config, "--logdir", str(logdir), "--resume", "lightning.trainer.max_steps=4"]) == 0
    ckpt = torch.load(logdir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 4
    state = ckpt["state_dict"]
    # The exported UNet weights are the EMA weights, and they differ from the raw ones.
    exported = load_state_dict(logdir / "model.safetensors")
    key = "model.diffusion_model.out.2.weight"
    ema = state["model.model_ema." + key.removeprefix("model.").replace(".", "")]
    assert torch.equal(exported[key], ema) and not torch.equal(ema, state["model." + key])
    # The frozen parts are unchanged: the autoencoder is the stage-1 one.
    vae = load_state_dict(first_stage)
    assert all(torch.equal(exported["first_stage_model." + k], v) for k, v in vae.items())
    # The inference config (use_ema False) loads the export strictly.
    model = load_model_from_config(tiny_config(), export)
    assert not model.use_ema


def test_resume_refuses_a_checkpoint_of_another_config(vae_run, capsys):
    args = ["--base", vae_run["config"], "--logdir", str(vae_run["logdir"]), "--resume", "model.params.kl_weight=0.5"]
    assert main.main(args) == 2
    err = capsys.readouterr().err
    assert "different model config" in err and "kl_weight" in err


def test_resume_without_a_checkpoint_is_refused(vae_run, tmp_path, capsys):
    assert main.main(["--base", vae_run["config"], "--logdir", str(tmp_path / "new"), "--resume"]) == 2
    assert "no checkpoint to resume from" in capsys.readouterr().err


def test_missing_or_wrong_config_is_refused(tmp_path, capsys):
    assert main.main(["--base", str(tmp_path / "nope.yaml")]) == 2
    assert "config not found" in capsys.readouterr().err
    assert main.main(["--base", str(DEMO_CONFIG), "--logdir", str(tmp_path / "x")]) == 2
    assert "not a training config" in capsys.readouterr().err


def test_missing_data_folder_is_refused(tmp_path, capsys):
    config = vae_training_config()
    config["data"] = {"target": "ldm.data.folder.ImageCaptionFolder", "params": {"root": str(tmp_path / "nope"), "size": 16}}
    assert main.main(["--base", save_yaml(config, tmp_path / "c.yaml"), "--logdir", str(tmp_path / "run")]) == 2
    assert "data folder not found" in capsys.readouterr().err


def test_first_stage_checkpoint_of_another_autoencoder_is_refused(tmp_path, capsys):
    other = AutoencoderKL(**OmegaConf.load(DEMO_CONFIG).model.params.first_stage_config.params)
    torch.save({"state_dict": other.state_dict()}, tmp_path / "other.ckpt")
    config = save_yaml(ldm_config(str(tmp_path / "other.ckpt")), tmp_path / "ldm.yaml")
    assert main.main(["--base", config, "--logdir", str(tmp_path / "run")]) == 2
    assert "does not fit the config's first_stage_config" in capsys.readouterr().err


def test_wrong_data_or_model_parameters_are_refused(tmp_path, capsys):
    config = vae_training_config()
    config["data"]["params"]["colours"] = ["purple"]
    assert main.main(["--base", save_yaml(config, tmp_path / "c.yaml"), "--logdir", str(tmp_path / "run")]) == 2
    assert "purple" in capsys.readouterr().err
    config = vae_training_config()
    config["model"]["params"]["no_such_option"] = 1
    assert main.main(["--base", save_yaml(config, tmp_path / "d.yaml"), "--logdir", str(tmp_path / "run2")]) == 2
    assert "no_such_option" in capsys.readouterr().err
