"""Training on several devices and machines through Lightning's own strategies (DDP).

``main.py --accelerator cpu|gpu --devices N --num_nodes M --strategy ddp`` (or the same keys under
``lightning.trainer`` in the config; flags win) trains one model copy per device: each rank reads
its own part of every epoch (Lightning's DistributedSampler), gradients are averaged, and every
rank ends with the same weights. Rank 0 alone writes checkpoints and the exported weights.
Multi-node runs are started by torchrun or SLURM (Lightning reads their environment). See
docs/distributed.md. This module stays free of Lightning imports (main.py parses its flags before
importing it); the callbacks live in :mod:`ldm.training.ddp`.
"""

from __future__ import annotations

import argparse
from typing import Any

# Strategies whose ranks hold whole copies of the model: what the checkpoint callback (rank 0
# writes) and the export (rank 0's module) assume. Sharded ones (FSDP, DeepSpeed) do not fit.
SUPPORTED_STRATEGIES = ("auto", "ddp", "ddp_spawn", "ddp_fork", "ddp_notebook", "ddp_find_unused_parameters_true",
                        "ddp_find_unused_parameters_false", "ddp_spawn_find_unused_parameters_true", "single_device")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """main.py's flags for devices and nodes; unset ones leave the config's (or Lightning's) choice."""
    group = parser.add_argument_group("devices and nodes (see docs/distributed.md)")
    group.add_argument("--accelerator", default=None, help="cpu, gpu, ... (default: the config's, else auto)")
    group.add_argument("--devices", default=None,
                       help="devices (processes) per node: a count, a list such as 0,1, or auto (default: the config's, else 1)")
    group.add_argument("--num_nodes", type=int, default=None, help="machines (default: the config's, else 1)")
    group.add_argument("--strategy", default=None,
                       help="Lightning strategy: ddp (one process per device, launched by Lightning, torchrun or SLURM), "
                            "ddp_spawn, ... (default: the config's, else auto)")


def _devices(text: str) -> int | str:
    return int(text) if text.lstrip("-").isdigit() else text


def trainer_options(args: argparse.Namespace, options: dict[str, Any]) -> dict[str, Any]:
    """``options`` (from the config) with the flags that were given laid over them."""
    flags = {"accelerator": args.accelerator, "devices": None if args.devices is None else _devices(args.devices),
             "num_nodes": args.num_nodes, "strategy": args.strategy}
    return {**options, **{k: v for k, v in flags.items() if v is not None}}


def unsupported(options: dict[str, Any]) -> str | None:
    """Why these trainer options cannot train here, or None."""
    strategy = options.get("strategy", "auto")
    if isinstance(strategy, str) and strategy not in SUPPORTED_STRATEGIES:
        return (f"strategy {strategy!r} is not supported: checkpoints and the export need whole model copies on rank 0; "
                f"use one of {', '.join(SUPPORTED_STRATEGIES)}")
    nodes = options.get("num_nodes", 1)
    if not isinstance(nodes, int) or nodes < 1:
        return f"num_nodes must be a positive integer, got {nodes!r}"
    return None


def callbacks(seed: int) -> list:
    """What several-rank training adds to main.py's callbacks (each does nothing with one rank)."""
    from ldm.training.ddp import RankSeeds, SameWeightsCheck

    return [RankSeeds(seed), SameWeightsCheck()]
