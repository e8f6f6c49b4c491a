"""Generation over several processes and machines (torchrun), and resumable jobs.

A *job* is what the flags describe: ``n_iter`` passes over the prompt batches. Its batches are
numbered in order (the *global batch index*) and so are its images (the *global image index*).
Under ``torchrun`` every process (rank) generates the batches ``index % world_size == rank`` of the
batches still to do, and writes each image under the name its global index gives, so the files do
not depend on how many processes ran, or on whether a job was resumed (``--skip_existing``).

Seeds: one process without ``--skip_existing`` draws every batch's noise from one stream seeded
once, as the original script (the *stream* rule); a batch's noise then depends on every batch
before it, which cannot be split across processes. Otherwise each batch reseeds from
:func:`batch_seed` of (seed, global batch index) (the *batch* rule). See docs/distributed.md.

Failures: a process that fails records why in the job's key-value store (torchrun's c10d store);
the others read it between batches and stop; every process then meets the others once more to
report. A killed process is handled by torchrun (it stops the others with SIGTERM) or, without
torchrun's agent, by gloo's dead-peer detection and the process group's timeout.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import logging
import os
import signal
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from ldm.generation.argtypes import float_in
from ldm.generation.errors import GenerationError, UsageError

logger = logging.getLogger(__name__)

SEED_MODES = ("stream", "batch")
DEFAULT_TIMEOUT = 1800.0  # seconds; PyTorch's own default for gloo and NCCL collectives


# -- the job: its batches, their seeds, which process runs which --------------------------------


def batch_seed(seed: int, index: int) -> int:
    """The seed of global batch ``index`` under the batch rule: the first four bytes, little-endian,
    of SHA-256("ldm-sd2 batch seed {seed} {index}"). A hash, not ``seed + index``, so that runs with
    neighbouring seeds share no batch; 32 bits, so that it is itself a valid ``--seed``."""
    digest = hashlib.sha256(f"ldm-sd2 batch seed {seed} {index}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


@dataclass(frozen=True)
class Unit:
    """One prompt batch of the job: the unit of work a process takes."""

    index: int  # global batch index: iteration * batches per iteration + number
    iteration: int
    number: int  # the batch's place in its iteration
    prompts: tuple[str, ...]
    first_image: int  # global image index of its first image

    @property
    def images(self) -> range:
        return range(self.first_image, self.first_image + len(self.prompts))


def job_digest(units: Sequence[Unit], metadata: dict[str, str]) -> str:
    """A fingerprint of the job (its batches and the settings its PNGs record): every rank must
    hold the same one, or they would split different jobs (a prompt file that differs between nodes)."""
    return hashlib.sha256(repr(([(u.index, u.prompts) for u in units], sorted(metadata.items()))).encode()).hexdigest()


def check_same_job(digests: Sequence[str]) -> None:
    """Raise when the ranks do not all describe the same job."""
    if len(set(digests)) > 1:
        ranks = [r for r, d in enumerate(digests) if d != digests[0]]
        raise GenerationError(f"rank{'s' * (len(ranks) > 1)} {', '.join(map(str, ranks))} read another job than rank 0 (different "
                              "prompts, flags or model files): every process must see the same --from-file and files")


def job_units(batches: Sequence[Sequence[str]], n_iter: int) -> list[Unit]:
    """Every batch of the job in the single-process order: iterations, then batches."""
    units, image = [], 0
    for iteration in range(n_iter):
        for number, prompts in enumerate(batches):
            units.append(Unit(len(units), iteration, number, tuple(prompts), image))
            image += len(prompts)
    return units


@dataclass
class JobSettings:
    """How a job is split and seeded: ``seed_mode`` None picks stream for one process, batch
    otherwise; ``skip_existing`` names image i ``{i:05}.png`` and skips images already written."""

    seed_mode: str | None = None
    skip_existing: bool = False
    timeout: float = DEFAULT_TIMEOUT

    def __post_init__(self) -> None:
        if self.seed_mode is not None and self.seed_mode not in SEED_MODES:
            raise UsageError(f"seed_mode {self.seed_mode!r}: choose one of {', '.join(SEED_MODES)}")
        if not self.timeout > 0:
            raise UsageError(f"timeout must be positive, got {self.timeout}")

    def resolved_seed_mode(self, world_size: int) -> str:
        """The rule this job uses; the stream rule cannot be split or resumed."""
        if self.seed_mode == "stream" and (world_size > 1 or self.skip_existing):
            why = f"{world_size} processes" if world_size > 1 else "--skip_existing"
            raise UsageError(f"--seed_mode stream cannot be used with {why}: each batch's noise would depend on "
                             "batches generated elsewhere; use --seed_mode batch (see docs/distributed.md)")
        if self.seed_mode is not None:
            return self.seed_mode
        return "batch" if world_size > 1 or self.skip_existing else "stream"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of several-process and resumable jobs (every task has them)."""
    group = parser.add_argument_group("several processes (torchrun) and resumable jobs; see docs/distributed.md")
    group.add_argument("--seed_mode", choices=SEED_MODES, default=None,
                       help="stream: one seeded noise stream in batch order, the original script's images; batch: each "
                            "batch reseeded from (seed, batch index), the same images for any number of processes "
                            "(default: stream for one process, batch under torchrun or with --skip_existing)")
    group.add_argument("--skip_existing", action="store_true",
                       help="resumable job: image i is samples/{i:05}.png (from 0, not after the files there) and "
                            "images whose file exists are not generated again")
    group.add_argument("--dist_timeout", type=float_in(1.0), default=DEFAULT_TIMEOUT, metavar="SECONDS",
                       help="under torchrun: how long a process waits for the others, at the start and at the end, "
                            "before stopping with an error (default: %(default)s)")


def settings_from_args(args: argparse.Namespace) -> JobSettings:
    return JobSettings(args.seed_mode, args.skip_existing, args.dist_timeout)


@dataclass
class Plan:
    """What rank 0 decided for everyone: how files are numbered and which images exist already."""

    seed_mode: str
    base: int | None  # file number of global image 0; None: the next free number at each save (one process)
    existing: frozenset[int] = frozenset()  # --skip_existing: global image indices already on disk
    total_images: int = 0

    def todo(self, units: Sequence[Unit]) -> list[Unit]:
        """The batches with at least one image still to write."""
        return [u for u in units if not all(i in self.existing for i in u.images)]

    def share(self, units: Sequence[Unit], rank: int, world_size: int) -> list[Unit]:
        """This rank's batches: every ``world_size``-th batch still to do, so that each rank gets the
        same number (one more at most) and files appear roughly in order."""
        return self.todo(units)[rank::world_size]

    def file_number(self, image: int) -> int | None:
        return None if self.base is None else self.base + image


def check_existing(sample_dir: Path, units: Sequence[Unit], metadata: dict[str, str], seed: int) -> frozenset[int]:
    """Global image indices of the job whose ``{i:05}.png`` exists, each checked to come from this
    job (same prompt, place, batch seed and generation settings) so that a resumed job never mixes
    in another's. Files are written whole (atomically), so one that exists is complete."""
    if not sample_dir.is_dir():
        return frozenset()
    from PIL import Image

    names = set(os.listdir(sample_dir))
    existing = set()
    for unit in units:
        for k, image in enumerate(unit.images):
            name = f"{image:05}.png"
            if name not in names:
                continue
            want = {**metadata, "prompt": unit.prompts[k], "iteration": str(unit.iteration), "batch_index": str(k),
                    "batch_seed": str(batch_seed(seed, unit.index))}
            try:
                with Image.open(sample_dir / name) as png:
                    have = dict(png.info)
            except OSError as e:
                raise GenerationError(f"--skip_existing: {sample_dir / name} cannot be read as a PNG ({e}); move it away") from None
            wrong = [k for k in want if str(have.get(k)) != want[k]]
            if wrong:
                key = wrong[0]
                raise GenerationError(
                    f"--skip_existing: {sample_dir / name} was not written by this job ({key} {have.get(key)!r}, this job "
                    f"{want[key]!r}): resume with the flags that started the job, or use another --outdir"
                )
            existing.add(image)
    return frozenset(existing)


@dataclass
class RankReport:
    """One process's share of a run, for rank 0's summary and statistics."""

    rank: int
    host: str
    device: str
    images: int
    batches: int
    seconds: float  # timed: sampling and decoding, as the single-process "seconds"
    peak_gpu_memory_bytes: int | None
    saved: list[str]  # the file names it wrote

    @property
    def images_per_second(self) -> float | None:
        return self.images / self.seconds if self.seconds else None


def job_stats(reports: Sequence[RankReport], plan: Plan, steps_per_batch: int) -> dict[str, Any]:
    """What the stats file adds for a job split over processes or resumable: the aggregate
    throughput (every rank's images over the longest rank's timed seconds) and each rank's figures."""
    seconds = max(r.seconds for r in reports)
    images = sum(r.images for r in reports)
    return {
        "world_size": len(reports),
        "seed_mode": plan.seed_mode,
        "job_images": plan.total_images,
        "skipped_images": len(plan.existing),
        "images_per_second": images / seconds if seconds else None,
        "ranks": [
            {"rank": r.rank, "host": r.host, "device": r.device, "images": r.images, "batches": r.batches, "seconds": r.seconds,
             "images_per_second": r.images_per_second,
             "iterations_per_second": r.batches * steps_per_batch / r.seconds if r.seconds else None,
             "peak_gpu_memory_bytes": r.peak_gpu_memory_bytes}
            for r in reports
        ],
    }


# -- the processes of a run -----------------------------------------------------------------------


class PeerFailed(GenerationError):
    """Another process of the run failed: this one stopped (its images written so far are complete)."""


class LostContact(GenerationError):
    """A collective failed or timed out: another process died or hangs."""


@dataclass
class Outcome:
    """What a rank reports to the others at a meeting: None or the error that stopped it, and data."""

    rank: int
    error: str | None = None
    data: Any = None
    stopped: bool = False  # the error is PeerFailed: this rank only stopped because another failed


def env_world() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) without it."""
    try:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError as e:
        raise UsageError(f"WORLD_SIZE, RANK and LOCAL_RANK must be integers: {e}") from None
    if world_size < 1 or not 0 <= rank < world_size:
        raise UsageError(f"RANK {rank} and WORLD_SIZE {world_size} do not describe a process of the run")
    return rank, world_size, local_rank


def log_prefix() -> str:
    """``[rank R/N] `` under torchrun with several processes, else nothing: for log lines and errors."""
    try:
        rank, world_size, _ = env_world()
    except UsageError:
        return ""
    return f"[rank {rank}/{world_size}] " if world_size > 1 else ""


@dataclass
class Session:
    """This process among the run's: rank, world size and, with several, the process group.

    With one process (no torchrun, or ``--nproc_per_node 1``) nothing is initialised and every
    meeting returns this process's own outcome.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    timeout: float = DEFAULT_TIMEOUT
    _store: Any = field(default=None, repr=False)
    _group: Any = field(default=None, repr=False)

    @classmethod
    def from_env(cls, timeout: float = DEFAULT_TIMEOUT) -> "Session":
        rank, world_size, local_rank = env_world()
        return cls(rank, world_size, local_rank, timeout)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def device(self, device: str) -> str:
        """The device this rank runs on: ``cuda:LOCAL_RANK`` for ``cuda`` under torchrun."""
        if not self.distributed or device != "cuda":
            return device
        if not torch.cuda.is_available() or self.local_rank >= torch.cuda.device_count():
            raise UsageError(f"--device cuda: LOCAL_RANK {self.local_rank} but {torch.cuda.device_count()} CUDA device(s) "
                             "visible here; start at most that many processes per node (--nproc_per_node)")
        return f"cuda:{self.local_rank}"

    def start(self, device: str) -> None:
        """Join the run: rendezvous through torchrun's store, then the process group (NCCL for CUDA,
        gloo for the CPU) and a gloo group for the small objects the ranks exchange."""
        if not self.distributed:
            return
        import torch.distributed as dist

        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise UsageError(f"WORLD_SIZE is {self.world_size} but {' and '.join(missing)} unset: start the run with torchrun")
        timeout = datetime.timedelta(seconds=self.timeout)
        try:
            store, _, _ = next(dist.rendezvous("env://", self.rank, self.world_size, timeout=timeout))
            store.set_timeout(timeout)
            cuda = device.startswith("cuda")
            if cuda:
                torch.cuda.set_device(torch.device(device))
            dist.init_process_group("nccl" if cuda else "gloo", store=dist.PrefixStore("default_pg", store), rank=self.rank,
                                    world_size=self.world_size, timeout=timeout, device_id=torch.device(device) if cuda else None)
            self._group = dist.new_group(backend="gloo", timeout=timeout) if cuda else dist.group.WORLD
        except (RuntimeError, ValueError, TimeoutError) as e:
            raise LostContact(f"cannot join the other {self.world_size - 1} process(es) of the run within "
                              f"--dist_timeout {self.timeout:g} s: {_first_line(e)}") from None
        # torchrun restarts a failed run with the same store: keep each attempt's keys apart.
        self._store = dist.PrefixStore(f"ldm-generation/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
        logger.info("rank %d of %d on %s (%s), local rank %d", self.rank, self.world_size, socket.gethostname(), device, self.local_rank)

    def close(self) -> None:
        if self.distributed and self._group is not None:
            import torch.distributed as dist

            self._group = self._store = None
            dist.destroy_process_group()

    # -- failures between meetings ------------------------------------------------------------
    def report_failure(self, message: str) -> None:
        """Tell the other ranks, through the store, that this one failed; they stop at their next batch."""
        if self._store is None:
            return
        try:
            self._store.compare_set("failed", "", f"{self.rank}\n{message}")
        except Exception as e:  # noqa: BLE001  (the store is gone too: the others learn at the meeting)
            logger.warning("could not tell the other processes that this one failed: %s", _first_line(e))

    def check_peers(self) -> None:
        """Raise :class:`PeerFailed` when another rank reported a failure."""
        if self._store is None:
            return
        try:
            if not self._store.check(["failed"]):
                return
            rank, _, message = self._store.get("failed").decode().partition("\n")
        except Exception as e:  # noqa: BLE001
            raise LostContact(f"lost contact with the run's store (torchrun's agent or rank 0 died?): {_first_line(e)}") from None
        if int(rank) != self.rank:
            raise PeerFailed(f"stopped because rank {rank} failed: {message}")

    # -- meetings --------------------------------------------------------------------------------
    def all_gather(self, outcome: Outcome, what: str) -> list[Outcome]:
        """Every rank's outcome, in rank order; every rank must call it, failed or not."""
        if not self.distributed:
            return [outcome]
        import torch.distributed as dist

        gathered: list[Any] = [None] * self.world_size
        self._collective(lambda: dist.all_gather_object(gathered, outcome, group=self._group), what)
        return gathered

    def gather(self, obj: Any, what: str) -> list[Any] | None:
        """Every rank's ``obj`` on rank 0 (None elsewhere)."""
        if not self.distributed:
            return [obj]
        import torch.distributed as dist

        gathered: list[Any] | None = [None] * self.world_size if self.is_main else None
        self._collective(lambda: dist.gather_object(obj, gathered, dst=0, group=self._group), what)
        return gathered

    def _collective(self, call, what: str) -> None:
        try:
            call()
        except (RuntimeError, ValueError) as e:
            text = _first_line(e)
            why = "no answer" if "timed out" in text.lower() or "timeout" in text.lower() else "a process stopped without reporting"
            raise LostContact(f"{what}: {why} (killed, out of memory, or hanging for more than --dist_timeout "
                              f"{self.timeout:g} s): {text}") from None


def raise_failures(outcomes: Sequence[Outcome], rank: int, own: BaseException | None) -> None:
    """After a meeting: re-raise this rank's own error, or stop because of another rank's."""
    failed = [o for o in outcomes if o.error is not None and not o.stopped] or [o for o in outcomes if o.error is not None]
    if len(outcomes) > 1 and failed:
        _ignore_sigterm()
    if own is not None:
        raise own
    if failed:
        first = failed[0]
        more = f" (and rank{'s' * (len(failed) > 2)} {', '.join(str(o.rank) for o in failed[1:])})" if len(failed) > 1 else ""
        raise PeerFailed(f"stopped because rank {first.rank} failed{more}: {first.error}")


def _ignore_sigterm() -> None:
    """The run ends with an error on every rank: ignore SIGTERM from now on, so that the SIGTERM
    torchrun sends once the first rank exits does not replace this rank's own message."""
    try:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    except ValueError:  # not the main thread
        pass


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def describe(error: BaseException) -> str:
    """One line for the other ranks: the exception's type (unless it is one of ours) and message."""
    if isinstance(error, (GenerationError, UsageError)):
        return _first_line(error)
    return f"{type(error).__name__}: {_first_line(error)}"
