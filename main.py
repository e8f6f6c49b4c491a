"""Train a model of this package with pytorch-lightning, as the original ldm ``main.py`` does:

    python main.py --base configs/demo/shapes-demo-vae.yaml --logdir logs/shapes-vae

A training config has four sections: ``model`` (a LightningModule of :mod:`ldm.training`
and its params), ``data`` (a dataset, ``batch_size``, ``num_workers``), ``lightning``
(``trainer`` options such as ``max_steps``; ``checkpoint_every_n_steps``) and ``seed``.
Several ``--base`` files are merged in order; trailing ``key=value`` arguments override
them (``lightning.trainer.max_steps=100``). The run writes into ``--logdir``: the merged
config, ``checkpoints/last.ckpt`` (atomic), CSV loss logs and, at the end, the exported
weights ``model.safetensors``. ``--resume`` continues from ``checkpoints/last.ckpt``, exactly
where it was taken. On SIGTERM the run saves ``last.ckpt`` after the current step and exits
with status 143. See docs/training.md.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path
from typing import Any, Sequence

import torch
import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ldm.fileio import write_text
from ldm.loading import load_config
from ldm.training.data import ResumableDataLoader

logger = logging.getLogger("main")

SECTIONS = ("model", "data", "lightning")


class ConfigError(ValueError):
    """A training config that is missing a section or names something unusable."""


class Terminated(Exception):
    """Training stopped by SIGTERM, after writing its checkpoint."""


SIGTERM_EXIT_STATUS = 128 + signal.SIGTERM
"""The exit status after a SIGTERM, the shell's convention for a process ended by that signal."""


def parse_args(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-b", "--base", nargs="+", required=True, metavar="CONFIG", help="training config(s), merged in order")
    parser.add_argument("-l", "--logdir", default=None, help="output folder (default: logs/<name of the last config>)")
    parser.add_argument("-r", "--resume", action="store_true", help="continue from LOGDIR/checkpoints/last.ckpt")
    parser.add_argument("-s", "--seed", type=int, default=None, help="random seed (default: the config's `seed`, else 23)")
    parser.add_argument("--attention", choices=("sdpa", "vanilla", "xformers"), default=None,
                        help="attention kernel of the UNet's transformers (default: the package default, sdpa)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (1 is fastest on a busy shared machine)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the trained network")
    parser.add_argument("--export", default=None, metavar="PATH",
                        help="also write the exported weights to PATH (refuses to overwrite an existing file)")
    from ldm.training import distributed

    distributed.add_arguments(parser)
    return parser.parse_known_args(argv)


def load_training_config(paths: Sequence[str], overrides: Sequence[str]) -> DictConfig:
    """Merge the config files and ``key=value`` overrides; check the sections exist."""
    for arg in overrides:
        if "=" not in arg or arg.startswith("-"):
            raise ConfigError(f"unrecognised argument {arg!r} (overrides are written key=value)")
    configs = [load_config(path) for path in paths]  # a missing file: FileNotFoundError naming it
    config = OmegaConf.merge(*configs, OmegaConf.from_dotlist(list(overrides)))
    missing = [s for s in SECTIONS if s not in config]
    if missing:
        raise ConfigError(
            f"{', '.join(paths)}: not a training config, it lacks the section(s) {missing} "
            f"(a training config has {list(SECTIONS)}; inference configs such as "
            "configs/demo/shapes-demo.yaml are referenced from one, e.g. configs/demo/shapes-demo-ldm.yaml)"
        )
    for section in ("model", "data"):
        if "target" not in config[section]:
            raise ConfigError(f"config section `{section}` names no `target`")
    params = config.model.get("params") or {}
    if isinstance(params.get("ldm_config"), str):
        # Inline the referenced inference config, so the run's saved config stands alone.
        config.model.params.ldm_config = load_config(params.ldm_config).model
    return config


def build_data(config: DictConfig, seed: int) -> ResumableDataLoader:
    from ldm.util import instantiate_from_config

    dataset = instantiate_from_config(config.data)
    batch_size = int(config.data.get("batch_size", 16))
    if len(dataset) == 0:
        raise ConfigError("the data set is empty")
    return ResumableDataLoader(
        dataset, batch_size=min(batch_size, len(dataset)), seed=seed, num_workers=int(config.data.get("num_workers", 0))
    )


def check_resume(ckpt: Path, config_yaml: str) -> None:
    """Refuse a checkpoint written by a run of another config (the ``model`` sections differ)."""
    from ldm.checkpoint import CheckpointError
    from ldm.training.callbacks import CONFIG_KEY

    try:
        saved = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001  (any unreadable file gets the same clear message)
        raise CheckpointError(f"cannot read the checkpoint to resume from, {ckpt}: {e}") from e
    if not isinstance(saved, dict) or CONFIG_KEY not in saved:
        raise CheckpointError(f"{ckpt} was not written by main.py (it records no training config)")
    if saved[CONFIG_KEY] != config_yaml:
        old, new = set(saved[CONFIG_KEY].splitlines()), set(config_yaml.splitlines())
        diff = [f"  checkpoint: {line.strip()}" for line in sorted(old - new)][:5] + [
            f"  config:     {line.strip()}" for line in sorted(new - old)
        ][:5]
        raise CheckpointError(
            f"{ckpt} comes from a run with a different model config; resume with the config it was "
            "trained with, or start a new --logdir. Differences:\n" + "\n".join(diff)
        )


def run(argv: Sequence[str] | None = None) -> Path:
    """Train as the command line asks; returns the exported weights' path."""
    args, overrides = parse_args(argv)
    config = load_training_config(args.base, overrides)
    seed = args.seed if args.seed is not None else int(config.get("seed", 23))
    logdir = Path(args.logdir or Path("logs") / Path(args.base[-1]).stem)
    ckpt_dir = logdir / "checkpoints"
    last = ckpt_dir / "last.ckpt"
    if args.resume and not last.is_file():
        raise FileNotFoundError(f"--resume: no checkpoint to resume from at {last}")
    if not args.resume and last.exists():
        raise FileExistsError(f"{last} exists: pass --resume to continue that run, or choose another --logdir")
    if args.export and Path(args.export).exists():
        raise FileExistsError(f"{args.export} exists; refusing to overwrite it")
    model_yaml = OmegaConf.to_yaml(config.model, resolve=True)
    if args.resume:
        check_resume(last, model_yaml)

    import pytorch_lightning as pl
    from pytorch_lightning.loggers import CSVLogger
    from pytorch_lightning.utilities.exceptions import SIGTERMException

    from ldm.checkpoint import save_state_dict
    from ldm.training import distributed
    from ldm.training.callbacks import AtomicCheckpoint, RandomState
    from ldm.util import instantiate_from_config

    if args.threads:
        torch.set_num_threads(args.threads)
    pl.seed_everything(seed, workers=True)
    try:  # a config naming the wrong things fails here, with the config's name in the message
        module = instantiate_from_config(config.model)
        loader = build_data(config, seed)
    except (ValueError, TypeError, KeyError, ImportError, AttributeError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{', '.join(args.base)}: {type(e).__name__}: {e}") from e
    if not isinstance(module, pl.LightningModule):
        raise ConfigError(f"model.target must be a LightningModule (see ldm.training), got {type(module).__name__}")
    if args.attention:
        from ldm.modules.attention import set_attention_implementation

        set_attention_implementation(module, args.attention)
    if args.compile:
        module.compile_model()

    logdir.mkdir(parents=True, exist_ok=True)
    write_text(logdir / "config.yaml", OmegaConf.to_yaml(config), overwrite=True)
    lightning = config.lightning
    checkpoint = AtomicCheckpoint(ckpt_dir, int(lightning.get("checkpoint_every_n_steps", 500)), model_yaml)
    trainer_options: dict[str, Any] = {"max_epochs": -1, "log_every_n_steps": 25, "accelerator": "auto", "devices": 1}
    trainer_options.update(OmegaConf.to_container(lightning.get("trainer", {}), resolve=True))
    trainer_options = distributed.trainer_options(args, trainer_options)  # --devices, --num_nodes, --strategy
    if problem := distributed.unsupported(trainer_options):
        raise ConfigError(problem)
    trainer = pl.Trainer(
        default_root_dir=str(logdir),
        logger=CSVLogger(str(logdir), name="logs"),
        callbacks=[checkpoint, RandomState(), *distributed.callbacks(seed)],
        enable_checkpointing=False,
        use_distributed_sampler=False,  # the resumable loader splits the epoch between ranks itself
        **trainer_options,
    )
    try:
        trainer.fit(module, loader, ckpt_path=str(last) if args.resume else None, weights_only=True)
    except SIGTERMException:
        raise Terminated(
            f"SIGTERM after step {checkpoint.last_saved_step}, which is saved in {last}; "
            "run the same command with --resume to continue from there"
        ) from None
    exported = logdir / "model.safetensors"
    if not trainer.is_global_zero:  # several ranks: rank 0 exports
        return exported

    state = module.export_state_dict()
    metadata = {"config": model_yaml, "global_step": str(trainer.global_step), "seed": str(seed)}
    if hasattr(module, "latent_std"):
        batch = next(iter(torch.utils.data.DataLoader(loader.source, batch_size=64, shuffle=False)))
        std = module.latent_std(batch[module.image_key])
        metadata["latent_std"] = repr(std)
        logger.info("latent std %.5f: a diffusion model on these latents wants scale_factor %.5f", std, 1 / std)
    save_state_dict(state, exported, overwrite=True, metadata=metadata)
    logger.info("exported weights to %s", exported)
    if args.export:
        save_state_dict(state, args.export, metadata=metadata)
        logger.info("exported weights to %s", args.export)
    return exported


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from ldm.checkpoint import CheckpointError

    try:
        exported = run(argv)
    except (ConfigError, CheckpointError, OSError, OmegaConfBaseException, yaml.YAMLError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Terminated as e:
        print(f"stopped: {e}", file=sys.stderr)
        return SIGTERM_EXIT_STATUS
    print(f"done: weights in {exported}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
