"""Interrupted training loses nothing: a run killed with SIGKILL (mid-step, mid-epoch or just
after an epoch's last checkpoint) or stopped by SIGTERM, then started again with --resume, ends
with exactly the weights, EMA and optimizer state of the uninterrupted run.

Every run is a real process (marked slow; forked from a forkserver that has imported torch and Lightning
once, which saves some ten seconds a run) stopped by a real signal. Both sides of each comparison
run the same code on the same CPU with one thread, so they agree bit for bit (torch.equal).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import sys
import time
from pathlib import Path

import pytest
import torch

import main
from conftest import save_yaml, tiny_config
from ldm.checkpoint import load_state_dict
from ldm.training.callbacks import AtomicCheckpoint
from ldm.training.diffusion import LatentDiffusionTrainer

# 12 samples in batches of 4: 3 steps an epoch, steps 1-3 in epoch 0, 4-6 in epoch 1, 7-8 in epoch 2.
STEPS = 8


def write_config(folder: Path) -> str:
    config = {
        "seed": 5,
        "model": {
            "target": "ldm.training.diffusion.LatentDiffusionTrainer",
            # ucg_rate 0.5: the caption-dropout generator matters; ShapesDataset's "index" feeds
            # the posterior cache; ema_decay 0.9: the EMA moves visibly.
            "params": {"ldm_config": tiny_config().model, "ucg_rate": 0.5, "ema_decay": 0.9},
        },
        "data": {"target": "ldm.data.shapes.ShapesDataset", "params": {"num_samples": 12, "size": 16}, "batch_size": 4},
        "lightning": {
            "checkpoint_every_n_steps": 100,  # each interruption sets its own
            "trainer": {"max_steps": STEPS, "log_every_n_steps": 1, "enable_progress_bar": False},
        },
    }
    return save_yaml(config, folder / "train.yaml")


def _pause(step: int, marker: str):
    """A callback hook that, at ``trainer.global_step == step``, creates ``marker`` and waits for
    SIGTERM (Lightning's handler sets ``received_sigterm``) or to be killed."""

    def hook(self, trainer, *args) -> None:
        if trainer.global_step != step:
            return
        Path(marker).touch()
        deadline = time.monotonic() + 120
        while not trainer.received_sigterm:
            if time.monotonic() > deadline:
                os._exit(99)  # nobody came: end this process, the test fails on the status
            time.sleep(0.01)

    return hook


def child(argv: list[str], log: str, pause: tuple[str, int, str] | None) -> None:
    """The body of a training process: main.py with ``argv``, its output to ``log``, and
    optionally a pause (hook name, step, marker file) where the test sends its signal."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    if pause is not None:
        hook, step, marker = pause
        setattr(AtomicCheckpoint, hook, _pause(step, marker))
    sys.exit(main.main(argv))


@pytest.fixture(scope="module")
def forkserver() -> multiprocessing.context.BaseContext:
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["main", "pytorch_lightning", "ldm.training.diffusion", "test_resume"])
    return context


def train(forkserver, logdir: Path, *options: str, pause=None, signum: int | None = None) -> int:
    """Run main.py in a new process; with ``pause``, send ``signum`` once it is paused there.
    Returns the exit status (minus the signal number for a process the signal ended)."""
    argv = ["--base", str(logdir.parent / "train.yaml"), "--logdir", str(logdir), "--threads", "1", *options]
    marker = logdir.parent / f"{logdir.name}.paused"
    marker.unlink(missing_ok=True)
    process = forkserver.Process(
        target=child, args=(argv, str(logdir.parent / f"{logdir.name}.log"), pause and (*pause, str(marker)))
    )
    process.start()
    if pause is not None:
        deadline = time.monotonic() + 300
        while not marker.exists():
            assert process.is_alive() and time.monotonic() < deadline, "the run never reached its pause"
            time.sleep(0.02)
        os.kill(process.pid, signum)
    process.join(300)
    assert process.exitcode is not None, "the run did not end"
    return process.exitcode


def checkpoint(logdir: Path) -> dict:
    return torch.load(logdir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def uninterrupted(forkserver, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("resume")
    write_config(folder)
    logdir = folder / "reference"
    assert train(forkserver, logdir) == 0, (logdir.parent / "reference.log").read_text()
    return logdir


def assert_same_run(logdir: Path, reference: Path) -> None:
    got, want = checkpoint(logdir), checkpoint(reference)
    assert got["global_step"] == want["global_step"] == STEPS
    assert got["state_dict"].keys() == want["state_dict"].keys()
    differ = [k for k, v in want["state_dict"].items() if not torch.equal(got["state_dict"][k], v)]
    assert not differ, f"{len(differ)} tensors differ (EMA ones: {sum('model_ema' in k for k in differ)}): {differ[:4]}"
    (got_opt,), (want_opt,) = got["optimizer_states"], want["optimizer_states"]
    assert got_opt["state"].keys() == want_opt["state"].keys()
    for index, state in want_opt["state"].items():
        assert all(torch.equal(torch.as_tensor(got_opt["state"][index][k]), torch.as_tensor(v)) for k, v in state.items())
    exported, reference_export = load_state_dict(logdir / "model.safetensors"), load_state_dict(reference / "model.safetensors")
    assert all(torch.equal(exported[k], v) for k, v in reference_export.items())


# (signal, hook where the process is paused, global step there, checkpoint cadence, step saved)
INTERRUPTIONS = {
    # During step 6 (epoch 1's last), after its backward: the checkpoint of step 4, in the middle
    # of epoch 1, is the one to resume from; steps 5 and 6 are done again.
    "sigkill-mid-step-mid-epoch": (signal.SIGKILL, "on_before_optimizer_step", 5, 2, 4),
    # Between step 3 (epoch 0's last, checkpointed) and step 4.
    "sigkill-after-epoch-end": (signal.SIGKILL, "on_train_batch_start", 3, 3, 3),
    # During step 5, no periodic checkpoint in reach: SIGTERM finishes step 5 and saves it.
    "sigterm-mid-epoch": (signal.SIGTERM, "on_before_optimizer_step", 4, 100, 5),
    # During step 6, the last of epoch 1: Lightning stops after the epoch's end.
    "sigterm-last-batch-of-epoch": (signal.SIGTERM, "on_before_optimizer_step", 5, 100, 6),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(INTERRUPTIONS))
def test_interrupted_and_resumed_run_ends_with_the_uninterrupted_weights(forkserver, uninterrupted, case):
    signum, hook, step, every, saved = INTERRUPTIONS[case]
    logdir = uninterrupted.parent / case
    cadence = f"lightning.checkpoint_every_n_steps={every}"
    status = train(forkserver, logdir, cadence, pause=(hook, step), signum=signum)
    log = (logdir.parent / f"{case}.log").read_text()
    if signum == signal.SIGKILL:
        assert status == -signal.SIGKILL
    else:
        assert status == main.SIGTERM_EXIT_STATUS, log
        assert f"SIGTERM after step {saved}" in log and "--resume" in log
    assert checkpoint(logdir)["global_step"] == saved
    assert not list((logdir / "checkpoints").glob("*.tmp")), "temporary files left behind"
    assert train(forkserver, logdir, cadence, "--resume") == 0, (logdir.parent / f"{case}.log").read_text()
    assert_same_run(logdir, uninterrupted)


CAPTIONS = [f"caption {i}" for i in range(40)]


def started(module: LatentDiffusionTrainer, seed: int = 5) -> LatentDiffusionTrainer:
    torch.manual_seed(seed)  # as Lightning's seed_everything: the run's seed
    module.on_fit_start()
    return module


def test_the_caption_dropout_stream_continues_across_a_checkpoint():
    run = started(LatentDiffusionTrainer(tiny_config().model, ucg_rate=0.5))
    first = run.drop_captions(CAPTIONS)
    assert 0 < first.count("") < len(CAPTIONS)  # some dropped, some kept
    saved = {}
    run.on_save_checkpoint(saved)
    resumed = LatentDiffusionTrainer(tiny_config().model, ucg_rate=0.5)
    resumed.on_load_checkpoint(saved)
    started(resumed, seed=6)  # another seed: the checkpoint's stream wins
    assert resumed.drop_captions(CAPTIONS) == run.drop_captions(CAPTIONS) != first


def test_a_checkpoint_from_before_exact_resumption_still_resumes(caplog):
    """Without the trainer state in the checkpoint, caption dropout starts over from the run's seed."""
    module = LatentDiffusionTrainer(tiny_config().model, ucg_rate=0.5)
    with caplog.at_level(logging.WARNING, logger="ldm.training.diffusion"):
        module.on_load_checkpoint({"state_dict": {}})  # no trainer state in it
    assert "predates exact resumption" in caplog.text
    fresh = LatentDiffusionTrainer(tiny_config().model, ucg_rate=0.5)
    assert started(module).drop_captions(CAPTIONS) == started(fresh).drop_captions(CAPTIONS)
