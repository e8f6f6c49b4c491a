"""Benchmark generation configurations side by side, as the PyTorch 2 acceleration write-up did.

Every generation is its own process: ours a spawned child that runs the pipeline layer from typed
settings (``ldm.generation.timing``; any task, ``--task``), the peers ``scripts/benchmark_diffusers.py``
(diffusers, or its pipeline with an OpenVINO UNet), run round-robin over the configurations per
batch size so that drift hits all alike. Writes to ``--outdir``: ``runs.json`` and ``runs.csv``
(every run), ``summary.md`` (median and min-max seconds, change against configuration 2, or 1)
and one bar chart per batch size, ``plot_bs<N>.png``. See docs/benchmark.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import importlib
import json
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from ldm import benchmarking as bm
from ldm.checkpoint import CheckpointError
from ldm.diffusers_format import check_config, inspect_folder
from ldm.fileio import write_bytes
from ldm.generation.errors import GenerationError
from ldm.generation.model import model_geometry
from ldm.generation.speed import cpu_description
from ldm.generation.tasks import TASKS
from ldm.generation.timing import STATS, TimedRun, run_in_child
from ldm.loading import load_config

logger = logging.getLogger("benchmark")

ROOT = Path(__file__).resolve().parents[1]
PEER = ROOT / "scripts" / "benchmark_diffusers.py"
DEFAULT_CONFIG = ROOT / "configs" / "stable-diffusion" / "v2-inference.yaml"
RANDOM_WEIGHTS = "random-weights.safetensors"
RANDOM_SEED = 0
NOISE_NOTE = "random weights: the images are noise; only the timings mean something"
NATIVE_CONFIG, NATIVE_WEIGHTS = "native-mha-config.yaml", "native-mha-weights.safetensors"
CONVERTED_WEIGHTS = "diffusers-folder-weights.safetensors"  # a --ckpt diffusers folder, converted once for every run
RESULTS = ("runs.json", "runs.csv", "summary.md", "runs", NATIVE_CONFIG, NATIVE_WEIGHTS, CONVERTED_WEIGHTS)


def default_config(task: str) -> Path:
    """v2-inference.yaml for txt2img, else the task's family config."""
    return DEFAULT_CONFIG if task == "txt2img" else ROOT / TASKS[task].family_config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", choices=sorted(TASKS), default="txt2img",
                   help="the task timed; image tasks get a synthetic input picture (and mask) (default: %(default)s)")
    p.add_argument("--config", type=Path, default=None,
                   help="original-layout inference config (default: v2-inference.yaml, or the task's own family config)")
    weights = p.add_mutually_exclusive_group(required=True)
    weights.add_argument("--ckpt", type=Path, help="original-layout checkpoint (.ckpt or .safetensors), or a diffusers "
                         "folder (converted once into the outdir; without --config, txt2img takes the folder's own)")
    weights.add_argument(
        "--random-weights",
        action="store_true",
        help=f"the config's model with random weights (seed {RANDOM_SEED}), written once to the outdir and "
        "used by every configuration; the images are noise",
    )
    p.add_argument("--configs", nargs="+", metavar="NAME", help=f"configurations to run, of {list(bm.BY_NAME)} "
                   f"(default on a GPU: {' '.join(bm.DEFAULT_NAMES)}; on the CPU: {' '.join(bm.CPU_DEFAULT_NAMES)})")
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 2, 4])
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--steps", type=int, default=50, help="PLMS steps")
    p.add_argument("--n-iter", type=int, default=2, help="timed iterations per run (after one warm-up)")
    p.add_argument("--H", type=int, default=512)
    p.add_argument("--W", type=int, default=512)
    p.add_argument("--prompt", default="A photo")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=("autocast", "full"), default="autocast")
    p.add_argument(
        "--peer-precision",
        choices=("autocast", "full", "half"),
        help="the diffusers peer's precision (default: --precision); half = float16 weights, diffusers' usual set-up",
    )
    p.add_argument("--compile-mode", help="torch.compile mode for the compiled configurations (default: each script's own)")
    p.add_argument(
        "--native-mha",
        action="store_true",
        help="run the optimised configurations on the native-MHA layout (nn.MultiheadAttention, as the write-up's "
        "optimised code): the config and a converted checkpoint are written to the outdir",
    )
    p.add_argument("--timeout", type=float, help="seconds after which a run is killed and recorded as timeout")
    p.add_argument("--cpu-threads", type=int, help="OMP_NUM_THREADS/MKL_NUM_THREADS of every run (default: left alone)")
    p.add_argument("--outdir", type=Path, default=Path("outputs/benchmark"))
    p.add_argument("--force", action="store_true", help="replace the results of an earlier benchmark in --outdir")
    args = p.parse_args(argv)
    folder = None
    if args.ckpt is not None and args.ckpt.is_dir():
        try:
            folder = inspect_folder(args.ckpt)
        except CheckpointError as e:
            p.error(f"--ckpt: {e}")
    if args.config is None:
        args.config = folder.config_path if folder and args.task == "txt2img" else default_config(args.task)
    try:
        args.selected = bm.select(args.configs, args.device)
        bm.plan(args.selected, args.batch_sizes, args.rounds)
    except ValueError as e:
        p.error(str(e))
    for name in ("steps", "n_iter", "H", "W"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be positive")
    if args.ckpt is not None and folder is None and not args.ckpt.is_file():
        p.error(f"checkpoint not found: {args.ckpt}")
    try:
        config = load_config(args.config)
    except FileNotFoundError as e:
        p.error(str(e))
    if folder is not None:
        try:
            check_config(folder, config, args.config)
        except CheckpointError as e:
            p.error(f"--ckpt: {e}")
    if config.model.params.unet_config.params.get("use_native_mha", False):
        p.error(f"{args.config} is a native-MHA config: pass the original-layout config (add --native-mha for that layout)")
    try:
        factor = model_geometry(config, args.config).multiple
    except GenerationError as e:
        p.error(str(e))
    if args.H % factor or args.W % factor:
        p.error(f"--H and --W must be multiples of {factor} for {args.config} (got {args.H}x{args.W})")
    args.peer_precision = args.peer_precision or args.precision
    return args


def importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except Exception:  # a broken install (wrong torch build, missing library) counts as absent
        return False
    return True


def git_commit() -> str:
    """The checkout's commit, with ``-dirty`` when tracked files changed; "unknown" outside git."""
    def git(*cmd: str) -> str:
        return subprocess.run(["git", "-C", str(ROOT), *cmd], capture_output=True, text=True, check=True).stdout.strip()

    try:
        commit = git("rev-parse", "--short=12", "HEAD")
        return commit + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def prepare_outdir(outdir: Path, force: bool) -> None:
    """Create ``outdir``; refuse to touch an earlier benchmark's results there unless ``force``."""
    outdir.mkdir(parents=True, exist_ok=True)
    old = [outdir / n for n in RESULTS if (outdir / n).exists()] + sorted(outdir.glob("plot_bs*.png"))
    if old and not force:
        raise SystemExit(f"{outdir} holds results of an earlier benchmark ({', '.join(p.name for p in old)}); "
                         "pass --force to replace them, or choose another --outdir")
    for path in old:
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def random_checkpoint(config_path: Path, outdir: Path) -> Path:
    """The config's model with seeded random weights, saved once in ``outdir`` (reused while the
    config and seed are the same), so that ours and the peer run on identical weights."""
    from safetensors import safe_open

    from ldm.checkpoint import save_state_dict
    from ldm.loading import build_model

    path = outdir / RANDOM_WEIGHTS
    meta = {"config_sha256": hashlib.sha256(config_path.read_bytes()).hexdigest(), "seed": str(RANDOM_SEED), "note": NOISE_NOTE}
    if path.is_file():
        with safe_open(path, "pt") as f:
            if (f.metadata() or {}) == meta:
                logger.info("reusing %s", path)
                return path
    logger.info("building %s with random weights (seed %d) -> %s", config_path, RANDOM_SEED, path)
    torch.manual_seed(RANDOM_SEED)
    model = build_model(config_path, "cpu")
    save_state_dict(model.state_dict(), path, overwrite=True, metadata=meta)
    return path


def converted_checkpoint(config_path: Path, folder: Path, outdir: Path) -> Path:
    """The diffusers ``folder`` as an original-layout file for ``config_path`` in ``outdir``, so that
    ours, the peers and the native-MHA conversion all read the same weights from one file."""
    from ldm.checkpoint import load_state_dict, save_state_dict

    logger.info("converting the diffusers folder %s -> %s", folder, outdir / CONVERTED_WEIGHTS)
    save_state_dict(load_state_dict(folder, config=load_config(config_path)), outdir / CONVERTED_WEIGHTS, overwrite=True)
    return outdir / CONVERTED_WEIGHTS


def native_mha_files(config_path: Path, ckpt: Path, outdir: Path) -> tuple[Path, Path]:
    """The config with ``use_native_mha: true`` and the checkpoint converted to that layout, in ``outdir``."""
    from omegaconf import OmegaConf

    from ldm.native_mha import NATIVE, convert_checkpoint

    config = load_config(config_path)
    config.model.params.unet_config.params.use_native_mha = True
    write_bytes(outdir / NATIVE_CONFIG, overwrite=True, data=OmegaConf.to_yaml(config).encode())
    logger.info("converting %s to the native-MHA layout -> %s", ckpt, outdir / NATIVE_WEIGHTS)
    convert_checkpoint(ckpt, outdir / NATIVE_WEIGHTS, NATIVE, overwrite=True, progress=False)
    return outdir / NATIVE_CONFIG, outdir / NATIVE_WEIGHTS


def peer_command(args: argparse.Namespace, run: bm.PlannedRun, files: dict[bool, tuple[Path, Path]], rundir: Path) -> list[str]:
    """The command line of one peer run (scripts/benchmark_diffusers.py with the configuration's flags).
    ``files`` maps "optimised configuration" to its (config, checkpoint)."""
    config, ckpt = files[run.config.optimised]
    flags = list(run.config.flags)
    if "--compile" in flags and args.compile_mode:
        flags += ["--compile_mode", args.compile_mode]
    return [
        sys.executable, str(PEER), "--prompt", args.prompt, "--config", str(config), "--ckpt", str(ckpt),
        "--steps", str(args.steps), "--n_iter", str(args.n_iter), "--n_samples", str(run.batch_size), "--H", str(args.H),
        "--W", str(args.W), "--seed", str(args.seed), "--device", args.device, "--outdir", str(rundir), "--skip_first",
        "--time_file", str(rundir / "time.txt"), "--stats_file", str(rundir / STATS), "--precision", args.peer_precision, *flags,
    ]  # fmt: skip


def sampler_of(task: str) -> str:
    """PLMS, as the write-up, where the task allows it; else the task's own sampler."""
    samplers = TASKS[task].samplers()
    return "plms" if "plms" in samplers else samplers[0]


def timed_run(args: argparse.Namespace, run: bm.PlannedRun, files: dict[bool, tuple[Path, Path]], rundir: Path) -> TimedRun:
    """One run of ours: the benchmark's common model settings with the configuration's overrides."""
    config, ckpt = files[run.config.optimised]
    model = {"config": str(config), "ckpt": str(ckpt), "device": args.device, "precision": args.precision}
    model.update(run.config.settings)
    if model.get("compile") and args.compile_mode and "compile_mode" not in run.config.settings:
        model["compile_mode"] = args.compile_mode
    sampling = {"sampler": sampler_of(args.task), "steps": args.steps, "seed": args.seed}
    return TimedRun(model=model, outdir=str(rundir), task=args.task, prompt=args.prompt, n_samples=run.batch_size,
                    n_iter=args.n_iter, height=args.H, width=args.W, sampling=sampling, cpu_threads=args.cpu_threads)


def execute(cmd: list[str], rundir: Path, timeout: float | None, env: dict[str, str]) -> tuple[int | None, float, str]:
    """Run ``cmd`` in its own process group with its output in ``rundir/log.txt``;
    returns (exit status or None when killed at the time limit, wall seconds, output)."""
    log = rundir / "log.txt"
    start = time.perf_counter()
    with open(log, "w") as out:
        out.write(shlex.join(cmd) + "\n\n")
        out.flush()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env, start_new_session=True)
        returncode = None
        try:
            returncode = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        finally:  # at the time limit or on Ctrl-C: end the run and its compile workers
            if returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return returncode, time.perf_counter() - start, log.read_text(errors="replace")


def run_env(args: argparse.Namespace) -> dict[str, str]:
    env = dict(os.environ)
    if args.cpu_threads:
        env.update(OMP_NUM_THREADS=str(args.cpu_threads), MKL_NUM_THREADS=str(args.cpu_threads))
    return env


def run_one(args: argparse.Namespace, run: bm.PlannedRun, files: dict[bool, tuple[Path, Path]], commit: str) -> dict[str, Any]:
    """One process, its outputs in ``runs/bs<N>/<configuration>/round<R>/``, turned into a record."""
    rundir = args.outdir / "runs" / f"bs{run.batch_size}" / run.config.name / f"round{run.round:02}"
    rundir.mkdir(parents=True)
    if run.config.runner == "ldm":
        returncode, wall, output = run_in_child(timed_run(args, run, files, rundir), rundir / "log.txt", args.timeout)
    else:
        returncode, wall, output = execute(peer_command(args, run, files, rundir), rundir, args.timeout, run_env(args))
    common = {"wall_seconds": round(wall, 3), "device": args.device, "torch": torch.__version__, "commit": commit,
              "load_average": round(os.getloadavg()[0], 2)}
    stats_file = rundir / STATS
    if returncode != 0 or not stats_file.is_file():
        status, detail = bm.classify_failure(returncode, output) if returncode != 0 else ("failed", f"no {STATS} written")
        return bm.make_record(run, status, detail=detail, **common)
    stats = json.loads(stats_file.read_text())
    seconds = float(stats["seconds"])
    images = stats.get("images") or args.n_iter * run.batch_size
    return bm.make_record(
        run,
        "ok",
        seconds=seconds,
        seconds_per_image=seconds / images,
        images=images,
        peak_gpu_memory_bytes=stats.get("peak_gpu_memory_bytes"),
        warmup_seconds=stats.get("warmup_seconds"),
        **{**common, "device": stats.get("device") or args.device, "torch": stats.get("torch") or torch.__version__},
    )


def describe(args: argparse.Namespace, records: list[dict[str, Any]], commit: str) -> dict[str, Any]:
    """The settings shown at the top of the summary and stored in runs.json."""
    devices = Counter(r["device"] for r in records if r["status"] == "ok") or Counter([args.device])
    torches = Counter(r["torch"] for r in records if r["status"] == "ok") or Counter([torch.__version__])
    return {
        "title": f"{args.task}, {args.config.name}, {args.H}x{args.W}, {args.steps} {sampler_of(args.task).upper()} steps",
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": devices.most_common(1)[0][0],
        "torch": torches.most_common(1)[0][0],
        "commit": commit,
        "cpu": cpu_description() if args.device == "cpu" else None,
        "load_average": load_range(records),
        "config": str(args.config),
        "weights": f"random (seed {RANDOM_SEED})" if args.random_weights else str(args.ckpt),
        "size": f"{args.H}x{args.W}",
        "steps": args.steps,
        "task": args.task,
        "sampler": "PLMS (diffusers: PNDM in PLMS mode)" if args.task == "txt2img" else sampler_of(args.task).upper(),
        "precision": f"{args.precision} (diffusers: {args.peer_precision})",
        "layout": "native-MHA for the optimised configurations" if args.native_mha else "original (attention kernel chosen per configuration)",
        "cpu_threads": args.cpu_threads,
        "prompt": args.prompt,
        "seed": args.seed,
        "n_iter": args.n_iter,
        "rounds": args.rounds,
        "batch_sizes": args.batch_sizes,
        "configurations": [c.name for c in args.selected],
        "noise_note": NOISE_NOTE if args.random_weights else None,
    }


def load_range(records: list[dict[str, Any]]) -> str:
    """The 1-minute load averages seen at the end of the runs, lowest to highest (a busy machine's
    figures are only indicative)."""
    loads = [r["load_average"] for r in records if r.get("load_average") is not None] or [round(os.getloadavg()[0], 2)]
    return f"{min(loads):.2f}-{max(loads):.2f} (1-minute, at the end of each run; {os.cpu_count()} CPUs)"


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGTERM, _interrupt)  # as Ctrl-C: the running child's session is killed on the way out
    args = parse_args(argv)
    prepare_outdir(args.outdir, args.force)
    if args.random_weights:
        print(f"Note: {NOISE_NOTE}.")
    args.outdir = args.outdir.resolve()
    args.config = args.config.resolve()
    if args.random_weights:
        ckpt = random_checkpoint(args.config, args.outdir)
    else:
        ckpt = converted_checkpoint(args.config, args.ckpt, args.outdir) if args.ckpt.is_dir() else args.ckpt.resolve()
    files = {False: (args.config, ckpt)}
    files[True] = native_mha_files(args.config, ckpt, args.outdir) if args.native_mha else files[False]
    commit = git_commit()
    # xFormers counts when its ops module (what the original code uses) imports
    available = {m: importable("xformers.ops" if m == "xformers" else m) for c in args.selected for m in c.requires}
    runs = bm.plan(args.selected, args.batch_sizes, args.rounds)
    records: list[dict[str, Any]] = []
    gave_up: dict[tuple[str, int], str] = {}  # a configuration that failed at a batch size is not retried
    for i, run in enumerate(runs, 1):
        key = (run.config.name, run.batch_size)
        reason = bm.skip_reason(run.config, available) or gave_up.get(key)
        if run.config.runner != "ldm" and args.task != "txt2img":
            reason = "the peers run txt2img only"
        if reason:
            record = bm.make_record(run, "skipped", detail=reason, device=args.device, torch=torch.__version__, commit=commit)
        else:
            record = run_one(args, run, files, commit)
            if record["status"] != "ok":
                gave_up[key] = f"not run: {record['status']} in round {run.round}"
        records.append(record)
        bm.write_records(records, args.outdir / "runs.json", args.outdir / "runs.csv", describe(args, records, commit))
        shown = f"{record['seconds']:.3f} s" if record["status"] == "ok" else f"{record['status']}: {record['detail']}"
        print(f"[{i}/{len(runs)}] batch {run.batch_size}, round {run.round}, {run.config.name}: {shown}", flush=True)

    meta = describe(args, records, commit)
    summary = bm.markdown_summary(records, args.selected, args.batch_sizes, meta)
    write_bytes(args.outdir / "summary.md", overwrite=True, data=summary.encode())
    cells = bm.summarise(records)
    for b in args.batch_sizes:
        title = f"{meta['title']}, batch {b}\n{meta['device']}, torch {meta['torch']}, {meta['commit']}"
        bm.plot_batch(args.outdir / f"plot_bs{b}.png", cells, args.selected, b, title)
    print("\n" + summary)
    print(f"Results in {args.outdir}: runs.json, runs.csv, summary.md, " + ", ".join(f"plot_bs{b}.png" for b in args.batch_sizes))


if __name__ == "__main__":
    sys.exit(main())
