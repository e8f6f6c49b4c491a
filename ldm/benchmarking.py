"""The benchmark's catalogue of configurations, run plan, raw records, summary and plots.

``scripts/benchmark.py`` runs each generation as its own process and hands the results to the
functions here, which hold no process or GPU logic: they can be tested on made-up records.
The configurations follow the PyTorch 2 acceleration write-up (numbered 1-5), plus flash
attention, the CPU's set (eager and compiled at float32 and the default precision) and the peers
(diffusers, compiled or not; OpenVINO running the same UNet).
"""

from __future__ import annotations

import csv
import io
import json
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from ldm.fileio import write_bytes

STATUSES = ("ok", "failed", "oom", "timeout", "skipped")
"""What became of a run: timed, crashed, out of memory, killed after the time limit, not run."""

FIELDS = (
    "configuration",
    "label",
    "batch_size",
    "round",
    "status",
    "seconds",
    "seconds_per_image",
    "images",
    "peak_gpu_memory_bytes",
    "wall_seconds",
    "warmup_seconds",
    "load_average",
    "device",
    "torch",
    "commit",
    "detail",
)
"""Columns of the raw data: ``seconds`` is the time of the timed iterations (warm-up excluded);
``wall_seconds`` the whole process (start-up, loading, compilation); ``warmup_seconds`` the
untimed first batch (compilation, cold or from the cache, happens there); ``load_average`` the
machine's 1-minute load average when the run ended; ``detail`` why a run did not
time (skip reason, last line of the error)."""


@dataclass(frozen=True)
class Configuration:
    """One way of generating. Ours (runner "ldm") are ``ModelSettings`` overrides of the benchmark's
    common settings, run by the pipeline layer in a child process; the peers (runner "diffusers")
    are ``scripts/benchmark_diffusers.py`` with extra flags."""

    name: str
    label: str
    runner: str  # "ldm" (ldm.generation.timing) or "diffusers" (scripts/benchmark_diffusers.py)
    settings: Mapping[str, Any] = field(default_factory=dict, hash=False)  # ModelSettings fields (ldm)
    flags: tuple[str, ...] = ()  # command-line flags (diffusers)
    requires: tuple[str, ...] = ()  # modules that must be importable, else the configuration is skipped
    optimised: bool = False  # uses the optimised attention path (native MHA layout when asked)
    default: bool = True  # in the default set on a GPU
    cpu: bool = False  # in the default set on the CPU


_MATH = {"attention": "sdpa", "disable_flash": True, "disable_mem_efficient": True}
_MEM_EFFICIENT = {"attention": "sdpa", "disable_flash": True, "disable_math": True}
_FLASH = {"attention": "sdpa", "disable_mem_efficient": True, "disable_math": True}
_PEER = ("diffusers", "transformers")
_FULL = {"precision": "full"}

CONFIGURATIONS = (
    Configuration("original", "1. original, no xFormers", "ldm", {"attention": "vanilla"}, cpu=True),
    Configuration("xformers", "2. original + xFormers", "ldm", {"attention": "xformers"}, requires=("xformers",)),
    Configuration("math", "3. optimised, math attention", "ldm", _MATH, optimised=True),
    Configuration("mem_efficient", "4. optimised, mem-efficient attention", "ldm", _MEM_EFFICIENT, optimised=True),
    Configuration(
        "mem_efficient_compile", "5. optimised, mem-efficient + compile", "ldm", {**_MEM_EFFICIENT, "compile": True}, optimised=True
    ),
    Configuration("flash", "optimised, flash attention", "ldm", _FLASH, optimised=True),
    Configuration("flash_compile", "optimised, flash + compile", "ldm", {**_FLASH, "compile": True}, optimised=True, default=False),
    # The CPU's set: txt2img.py's defaults (SDPA, PyTorch's choice of backend) at both precisions, eager and compiled.
    Configuration("cpu_full", "CPU: eager, float32", "ldm", _FULL, optimised=True, default=False, cpu=True),
    Configuration("cpu_default", "CPU: eager, default precision", "ldm", {}, optimised=True, default=False, cpu=True),
    Configuration("cpu_compile_full", "CPU: --compile, float32", "ldm", {**_FULL, "compile": True}, optimised=True, default=False, cpu=True),
    Configuration("cpu_compile", "CPU: --compile, default precision (headline)", "ldm", {"compile": True}, optimised=True,
                  default=False, cpu=True),
    Configuration("cpu_compile_openvino", "CPU: --compile --compile_backend openvino (fed float32)", "ldm",
                  {"compile": True, "compile_backend": "openvino"}, requires=("openvino",), optimised=True, default=False),
    # Opt-in step caching (DeepCache, depth 1): never in a default set, its images differ (docs/benchmark.md).
    Configuration("cpu_compile_cache3", "CPU: --compile, default precision, --cache_interval 3", "ldm",
                  {"compile": True, "cache_interval": 3}, optimised=True, default=False),
    Configuration("cpu_compile_cache5", "CPU: --compile, default precision, --cache_interval 5", "ldm",
                  {"compile": True, "cache_interval": 5}, optimised=True, default=False),
    Configuration("cpu_compile_autotune", "CPU: --compile max-autotune, default precision", "ldm",
                  {"compile": True, "compile_mode": "max-autotune"}, optimised=True, default=False),
    Configuration("diffusers_sdpa", "diffusers, SDPA", "diffusers", requires=_PEER),
    Configuration("diffusers_sdpa_compile", "diffusers, SDPA + compile", "diffusers", flags=("--compile",), requires=_PEER, cpu=True),
    Configuration("openvino", "OpenVINO UNet (diffusers pipeline)", "diffusers", flags=("--openvino",),
                  requires=(*_PEER, "openvino"), default=False, cpu=True),
)
BY_NAME = {c.name: c for c in CONFIGURATIONS}
DEFAULT_NAMES = tuple(c.name for c in CONFIGURATIONS if c.default)
CPU_DEFAULT_NAMES = tuple(c.name for c in CONFIGURATIONS if c.cpu)
REFERENCES = ("xformers", "original")
"""The baseline of the percent changes: configuration 2, or 1 where 2 has no timing."""


def select(names: Sequence[str] | None, device: str = "cuda") -> list[Configuration]:
    """The configurations named (in catalogue order), or the default ones of ``device``'s type;
    unknown names are an error."""
    if not names:
        return [BY_NAME[n] for n in (CPU_DEFAULT_NAMES if device == "cpu" else DEFAULT_NAMES)]
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        raise ValueError(f"unknown configuration(s) {unknown}; choose from {list(BY_NAME)}")
    return [c for c in CONFIGURATIONS if c.name in set(names)]


def skip_reason(config: Configuration, importable: Mapping[str, bool]) -> str | None:
    """Why ``config`` cannot run here, or None; ``importable`` maps module names to availability."""
    missing = [m for m in config.requires if not importable.get(m, False)]
    if missing:
        return f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not installed (pip install {' '.join(missing)})"
    return None


@dataclass(frozen=True)
class PlannedRun:
    batch_size: int
    round: int  # from 1
    config: Configuration


def plan(configs: Sequence[Configuration], batch_sizes: Sequence[int], rounds: int) -> list[PlannedRun]:
    """Per batch size, the configurations round-robin (A B C ... A B C ...), so drift hits all alike."""
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    if not batch_sizes or any(b < 1 for b in batch_sizes):
        raise ValueError(f"batch sizes must be positive integers, got {list(batch_sizes)}")
    return [PlannedRun(b, r, c) for b in batch_sizes for r in range(1, rounds + 1) for c in configs]


def classify_failure(returncode: int | None, output: str) -> tuple[str, str]:
    """``(status, detail)`` of a process that did not time: "oom" for an out-of-memory error,
    "timeout" when it was killed (``returncode`` None), else "failed" with the error's last line."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    last = lines[-1] if lines else f"exit status {returncode}"
    if returncode is None:
        return "timeout", last
    if any("out of memory" in line.lower() or "OutOfMemoryError" in line for line in lines[-50:]):
        return "oom", last
    return "failed", last


def make_record(run: PlannedRun, status: str, **values: Any) -> dict[str, Any]:
    """A raw-data row with every field of :data:`FIELDS` (None where unknown)."""
    if status not in STATUSES:
        raise ValueError(f"unknown status {status!r}")
    record = dict.fromkeys(FIELDS)
    record.update(configuration=run.config.name, label=run.config.label, batch_size=run.batch_size, round=run.round)
    record.update(status=status, **values)
    return {k: record[k] for k in FIELDS}


def write_records(records: Sequence[Mapping[str, Any]], json_path: Path, csv_path: Path, meta: Mapping[str, Any]) -> None:
    """The raw data twice: JSON (with the benchmark's settings) and CSV (one row per run)."""
    write_bytes(json_path, overwrite=True, data=json.dumps({"meta": dict(meta), "runs": list(records)}, indent=1).encode())
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(records)
    write_bytes(csv_path, overwrite=True, data=buf.getvalue().encode())


@dataclass
class Cell:
    """One configuration at one batch size, over its rounds."""

    status: str  # "ok" if any round timed, else the most telling failure
    median: float | None = None
    low: float | None = None
    high: float | None = None
    timed: int = 0
    runs: int = 0
    peak_memory: int | None = None
    details: list[str] = field(default_factory=list)
    warmup_low: float | None = None  # seconds of the untimed first batch (compilation), over the timed rounds
    warmup_high: float | None = None


_FAILURE_ORDER = ("oom", "timeout", "failed", "skipped")


def summarise(records: Iterable[Mapping[str, Any]]) -> dict[tuple[str, int], Cell]:
    """Median, minimum and maximum seconds per (configuration, batch size) over the timed rounds."""
    groups: dict[tuple[str, int], list[Mapping[str, Any]]] = {}
    for r in records:
        groups.setdefault((r["configuration"], int(r["batch_size"])), []).append(r)
    cells = {}
    for key, rows in groups.items():
        ok = [float(r["seconds"]) for r in rows if r["status"] == "ok"]
        statuses = {r["status"] for r in rows}
        status = "ok" if ok else next(s for s in _FAILURE_ORDER if s in statuses)
        peaks = [int(r["peak_gpu_memory_bytes"]) for r in rows if r["status"] == "ok" and r["peak_gpu_memory_bytes"] is not None]
        # Why it did not time: the failures' last lines; skip reasons only where nothing ran.
        failed = [r for r in rows if r["status"] not in ("ok", "skipped")] or [r for r in rows if status == "skipped"]
        details = list(dict.fromkeys(str(r["detail"]) for r in failed if r["detail"]))
        cell = Cell(status, timed=len(ok), runs=len(rows), peak_memory=max(peaks) if peaks else None, details=details)
        if ok:
            cell.median, cell.low, cell.high = statistics.median(ok), min(ok), max(ok)
        warm = [float(r["warmup_seconds"]) for r in rows if r["status"] == "ok" and r.get("warmup_seconds") not in (None, "")]
        if warm:
            cell.warmup_low, cell.warmup_high = min(warm), max(warm)
        cells[key] = cell
    return cells


def reference(cells: Mapping[tuple[str, int], Cell], batch_size: int) -> str | None:
    """The configuration the others are compared with at ``batch_size`` (2, else 1), if it timed."""
    for name in REFERENCES:
        cell = cells.get((name, batch_size))
        if cell is not None and cell.status == "ok":
            return name
    return None


def _seconds(x: float) -> str:
    return f"{x:.3f}" if x < 1 else f"{x:.2f}"


def _status_text(cell: Cell) -> str:
    return {"oom": "OOM", "timeout": "timeout", "failed": "failed", "skipped": "skipped"}[cell.status]


def _time_text(cell: Cell | None) -> str:
    if cell is None:
        return "-"
    if cell.status != "ok":
        return _status_text(cell)
    text = f"{_seconds(cell.median)} ({_seconds(cell.low)}-{_seconds(cell.high)})"
    return text if cell.timed == cell.runs else f"{text}, {cell.timed}/{cell.runs} timed"


def _change_text(cell: Cell | None, ref: Cell | None) -> str:
    if cell is None:
        return "-"
    if cell.status != "ok":
        return _status_text(cell)
    if ref is None:
        return "n/a"
    if cell is ref:
        return "reference"
    change = (cell.median / ref.median - 1) * 100
    return f"{change:+.1f}% ({ref.median / cell.median:.2f}x)"


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def speedup(cells: Mapping[tuple[str, int], Cell], faster: str, slower: str, batch_size: int) -> float | None:
    """How many times faster ``faster`` ran than ``slower`` (ratio of medians), if both timed."""
    a, b = cells.get((faster, batch_size)), cells.get((slower, batch_size))
    if a is None or b is None or a.status != "ok" or b.status != "ok":
        return None
    return b.median / a.median


TARGETS = (
    ("mem_efficient_compile", "original", 1.6),
    ("mem_efficient_compile", "diffusers_sdpa_compile", 1.0),
    ("cpu_compile", "cpu_full", 1.5),
    ("cpu_compile", "original", 1.5),
    ("cpu_compile_full", "cpu_full", 1.0),
    ("cpu_compile", "diffusers_sdpa_compile", 1.0),
    ("cpu_compile", "openvino", 1.0),
)
"""The goals: on a GPU configuration 5 at least 1.6x faster than 1 and faster than diffusers compiled;
on the CPU the headline command (compiled, default precision) at least 1.5x eager float32 and the
original's configuration, compiled float32 never slower than eager, and ahead of both peers."""


def markdown_summary(
    records: Sequence[Mapping[str, Any]],
    configs: Sequence[Configuration],
    batch_sizes: Sequence[int],
    meta: Mapping[str, Any],
) -> str:
    """The write-up's tables: seconds (median, min-max), change against the reference, peak memory,
    the target ratios, and a note for every configuration that did not time."""
    cells = summarise(records)
    n_iter = meta.get("n_iter", 2)
    rounds = meta.get("rounds", "?")
    lines = [f"# Benchmark: {meta.get('title', 'txt2img')}", ""]
    for key in ("date", "device", "cpu", "torch", "commit", "load_average", "task", "config", "weights", "size", "steps", "sampler",
                "precision", "layout", "cpu_threads"):
        if meta.get(key) is not None:
            lines.append(f"- {key}: {meta[key]}")
    lines.append(f"- timed: {n_iter} iterations per run after one warm-up; {rounds} round(s), each run its own process")
    if meta.get("noise_note"):
        lines.append(f"- note: {meta['noise_note']}")
    header = ["Configuration", *(f"batch {b}" for b in batch_sizes)]

    lines += ["", f"## Seconds for {n_iter} iterations: median (min-max)", ""]
    lines += _table(header, ([c.label, *(_time_text(cells.get((c.name, b))) for b in batch_sizes)] for c in configs))

    refs = {b: reference(cells, b) for b in batch_sizes}
    ref_names = sorted({BY_NAME[r].label for r in refs.values() if r}, key=str)
    against = " / ".join(ref_names) if ref_names else "no reference (configurations 1 and 2 did not time)"
    lines += ["", f"## Change in seconds against {against} (negative is faster; speed-up in brackets)", ""]
    lines += _table(
        header,
        (
            [c.label, *(_change_text(cells.get((c.name, b)), cells.get((refs[b], b)) if refs[b] else None) for b in batch_sizes)]
            for c in configs
        ),
    )

    if any(cell.peak_memory is not None for cell in cells.values()):
        lines += ["", "## Peak GPU memory (GiB, largest over the rounds)", ""]

        def memory(cell: Cell | None) -> str:
            if cell is None or cell.status != "ok":
                return "-" if cell is None else _status_text(cell)
            return "-" if cell.peak_memory is None else f"{cell.peak_memory / 2**30:.2f}"

        lines += _table(header, ([c.label, *(memory(cells.get((c.name, b))) for b in batch_sizes)] for c in configs))

    if any(cell.warmup_low is not None for cell in cells.values()):
        lines += ["", "## Warm-up seconds (the untimed first batch: loading excluded, compilation included; lowest-highest)", ""]

        def warm(cell: Cell | None) -> str:
            if cell is None or cell.warmup_low is None:
                return "-" if cell is None or cell.status == "ok" else _status_text(cell)
            low, high = _seconds(cell.warmup_low), _seconds(cell.warmup_high)
            return low if low == high else f"{low}-{high}"

        lines += _table(header, ([c.label, *(warm(cells.get((c.name, b))) for b in batch_sizes)] for c in configs))

    chosen = {c.name for c in configs}
    targets = [t for t in TARGETS if t[0] in chosen and t[1] in chosen]
    if targets:
        lines += ["", "## Target ratios (speed-up of the first over the second; the goal in brackets)", ""]
        rows = []
        for faster, slower, goal in targets:
            ratios = [speedup(cells, faster, slower, b) for b in batch_sizes]
            name = f"{BY_NAME[faster].label} vs {BY_NAME[slower].label} (goal >= {goal:g}x)"
            rows.append([name, *("n/a" if r is None else f"{r:.2f}x" for r in ratios)])
        lines += _table(["Ratio", *(f"batch {b}" for b in batch_sizes)], rows)

    notes = []
    for c in configs:
        where: dict[str, list[str]] = {}  # the same reason at several batch sizes is one note
        for b in batch_sizes:
            cell = cells.get((c.name, b))
            for detail in cell.details if cell else ():
                where.setdefault(detail, []).append(str(b))
        notes += [f"- {c.label}, batch {', '.join(sizes)}: {detail}" for detail, sizes in where.items()]
    if notes:
        lines += ["", "## Runs that did not time", "", *notes]
    return "\n".join(lines) + "\n"


def plot_batch(
    path: str | os.PathLike,
    cells: Mapping[tuple[str, int], Cell],
    configs: Sequence[Configuration],
    batch_size: int,
    title: str,
) -> None:
    """A bar chart of one batch size: median seconds per configuration, error bars min-max;
    a configuration that did not time gets an empty slot labelled with its status. Written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(configs) + 2), 4.8))
    try:
        xs = range(len(configs))
        medians, lows, highs = [], [], []
        for c in configs:
            cell = cells.get((c.name, batch_size))
            timed = cell is not None and cell.status == "ok"
            medians.append(cell.median if timed else 0.0)
            lows.append(cell.median - cell.low if timed else 0.0)
            highs.append(cell.high - cell.median if timed else 0.0)
        colors = ["tab:gray" if c.runner != "ldm" else ("tab:blue" if c.optimised else "tab:orange") for c in configs]
        ax.bar(xs, medians, yerr=[lows, highs], capsize=4, color=colors)
        top = max([m + h for m, h in zip(medians, highs)] + [1e-9])
        for x, c, m, h in zip(xs, configs, medians, highs):
            cell = cells.get((c.name, batch_size))
            text = _seconds(m) if cell is not None and cell.status == "ok" else ("-" if cell is None else _status_text(cell))
            ax.text(x, m + h + 0.02 * top, text, ha="center", va="bottom", fontsize=8)
        ax.set_xticks(list(xs))
        ax.set_xticklabels([c.label for c in configs], rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("seconds (median, min-max)")
        ax.set_ylim(0, top * 1.15)
        ax.set_title(title, fontsize=10)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=120)
    finally:
        plt.close(fig)
    write_bytes(path, overwrite=True, data=buf.getvalue())
