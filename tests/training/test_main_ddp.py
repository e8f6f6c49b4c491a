"""main.py on several ranks through Lightning's DDP: a true 2-process run on the CPU (gloo) of the
tiny latent-diffusion stage, whose ranks end with identical weights and whose export generates."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, child_env, save_yaml, tiny_config, vae_training_config
from ldm.generation import main as generate
from ldm.training import distributed

DUMP_WEIGHTS = '''
import os, sys
import pytorch_lightning as pl
import torch
import main

class DumpWeights(pl.Callback):
    """Each rank saves the weights it ends with (the test compares them)."""
    def on_train_end(self, trainer, module):
        state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
        torch.save(state, os.path.join(os.environ["DUMP_DIR"], f"rank{trainer.global_rank}.pt"))

init = pl.Trainer.__init__
def with_dump(self, *args, callbacks=None, **kwargs):
    init(self, *args, callbacks=[*(callbacks or []), DumpWeights()], **kwargs)
pl.Trainer.__init__ = with_dump
sys.exit(main.main(sys.argv[1:]))
'''


def test_flags_override_the_config():
    args = argparse.Namespace(accelerator="cpu", devices="2", num_nodes=None, strategy="ddp")
    options = distributed.trainer_options(args, {"devices": 1, "num_nodes": 3, "max_steps": 5})
    assert options == {"devices": 2, "num_nodes": 3, "max_steps": 5, "accelerator": "cpu", "strategy": "ddp"}
    assert distributed.trainer_options(argparse.Namespace(accelerator=None, devices="0,1", num_nodes=None, strategy=None), {})["devices"] == "0,1"
    assert distributed.unsupported(options) is None
    assert "not supported" in distributed.unsupported({"strategy": "fsdp"})
    assert "num_nodes" in distributed.unsupported({"num_nodes": 0})


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_ends_with_identical_weights_and_a_usable_export(tiny_files, tmp_path):
    config = {
        "seed": 1,
        "model": {
            "target": "ldm.training.diffusion.LatentDiffusionTrainer",
            # The tiny model's autoencoder (first_stage_model.* of its checkpoint) as the frozen first stage.
            "params": {"ldm_config": tiny_config().model, "first_stage_ckpt": str(tiny_files["safetensors"]), "ema_decay": 0.9},
        },
        "data": {"target": "ldm.data.shapes.ShapesDataset", "params": {"num_samples": 16, "size": 64}, "batch_size": 4},
        "lightning": {"checkpoint_every_n_steps": 2, "trainer": {"max_steps": 3, "log_every_n_steps": 1, "enable_progress_bar": False}},
    }
    save_yaml(config, tmp_path / "ldm.yaml")
    (tmp_path / "train.py").write_text(DUMP_WEIGHTS)
    logdir = tmp_path / "run"
    cmd = [sys.executable, str(tmp_path / "train.py"), "--base", str(tmp_path / "ldm.yaml"), "--logdir", str(logdir),
           "--accelerator", "cpu", "--devices", "2", "--strategy", "ddp", "--threads", "1"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env(DUMP_DIR=str(tmp_path)), cwd=ROOT, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert "Starting with 2 processes" in output and "the weights of the 2 ranks are identical" in output
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert rank0.keys() == rank1.keys() and any(k.startswith("model.model_ema.") for k in rank0)
    different = [k for k in rank0 if not torch.equal(rank0[k], rank1[k])]
    assert not different, different[:5]
    # Rank 0 alone wrote the checkpoint (atomically, at the last step) and the export.
    ckpt = torch.load(logdir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 3 and not list(logdir.rglob("*.tmp"))
    assert torch.equal(ckpt["state_dict"]["model.model.diffusion_model.out.2.weight"], rank0["model.model.diffusion_model.out.2.weight"])
    # The export loads strictly with the inference config and generates.
    out = tmp_path / "images"
    flags = ["--config", str(tiny_files["config"]), "--ckpt", str(logdir / "model.safetensors"), "--outdir", str(out),
             "--H", "64", "--W", "64", "--steps", "2", "--n_samples", "1", "--n_iter", "1", "--precision", "full"]  # fmt: skip
    assert generate(flags) == 0
    assert len(list((out / "samples").glob("*.png"))) == 1


@pytest.mark.parametrize("strategy", ["fsdp", "deepspeed"])
def test_sharded_strategies_stop_before_training(tmp_path, capsys, strategy):
    import main

    config = save_yaml(vae_training_config(), tmp_path / "vae.yaml")
    assert main.main(["--base", config, "--logdir", str(tmp_path / "run"), "--strategy", strategy]) == 2
    assert f"strategy {strategy!r} is not supported" in capsys.readouterr().err
    assert not (tmp_path / "run" / "checkpoints").exists()
