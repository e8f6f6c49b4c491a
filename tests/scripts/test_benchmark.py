"""scripts/benchmark.py and ldm/benchmarking.py: the run plan, failure classification, the
summary's figures, the command lines, the random and native-MHA weight files, and one real
benchmark round on the tiny model on the CPU (data file, summary table and plots consistent;
marked slow)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, child_env, load_script, needs_proc, pids_with_env, wait_for
from ldm import benchmarking as bm
from ldm.checkpoint import load_state_dict
from ldm.generation import timing
from ldm.generation.settings import ModelSettings
from ldm.loading import load_model_from_config

SCRIPT = ROOT / "scripts" / "benchmark.py"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


benchmark = load_script("scripts/benchmark.py")


def record(name: str, batch: int, rnd: int, status: str = "ok", seconds: float | None = None, detail: str | None = None, peak=None):
    run = bm.PlannedRun(batch, rnd, bm.BY_NAME[name])
    return bm.make_record(run, status, seconds=seconds, peak_gpu_memory_bytes=peak, detail=detail)


# -- pure functions --------------------------------------------------------------------------
def test_plan_is_round_robin_per_batch_size():
    configs = bm.select(["original", "math", "flash"])
    runs = bm.plan(configs, [1, 4], 2)
    assert [(r.batch_size, r.round, r.config.name) for r in runs[:6]] == [
        (1, 1, "original"), (1, 1, "math"), (1, 1, "flash"), (1, 2, "original"), (1, 2, "math"), (1, 2, "flash"),
    ]
    assert len(runs) == 3 * 2 * 2 and runs[6].batch_size == 4


def test_select_and_validation():
    assert [c.name for c in bm.select(None)] == list(bm.DEFAULT_NAMES)
    assert "flash_compile" not in bm.DEFAULT_NAMES  # optional extra
    assert [c.name for c in bm.select(["flash", "original"])] == ["original", "flash"]  # catalogue order
    with pytest.raises(ValueError, match="unknown configuration"):
        bm.select(["fast"])
    with pytest.raises(ValueError, match="rounds"):
        bm.plan(bm.select(None), [1], 0)
    with pytest.raises(ValueError, match="batch sizes"):
        bm.plan(bm.select(None), [0], 1)


def test_write_up_configurations_have_the_write_ups_settings():
    settings = {c.name: dict(c.settings) for c in bm.CONFIGURATIONS if c.runner == "ldm"}
    assert settings["original"] == {"attention": "vanilla"}
    assert settings["xformers"] == {"attention": "xformers"}
    assert settings["math"] == {"attention": "sdpa", "disable_flash": True, "disable_mem_efficient": True}
    assert settings["mem_efficient"] == {"attention": "sdpa", "disable_flash": True, "disable_math": True}
    assert settings["mem_efficient_compile"] == {**settings["mem_efficient"], "compile": True}
    assert settings["flash"] == {"attention": "sdpa", "disable_mem_efficient": True, "disable_math": True}
    for name, fields in settings.items():  # every override is a ModelSettings field
        ModelSettings(**fields)


def test_cpu_configurations_and_default_sets():
    settings = {c.name: dict(c.settings) for c in bm.CONFIGURATIONS}
    assert settings["cpu_full"] == {"precision": "full"}
    assert settings["cpu_default"] == {}  # txt2img.py's defaults: the default precision
    assert settings["cpu_compile_full"] == {"precision": "full", "compile": True}
    assert settings["cpu_compile"] == {"compile": True}  # the headline command
    assert bm.BY_NAME["openvino"].flags == ("--openvino",) and "openvino" in bm.BY_NAME["openvino"].requires
    assert bm.BY_NAME["diffusers_sdpa_compile"].flags == ("--compile",)
    cpu = [c.name for c in bm.select(None, "cpu")]
    assert cpu == ["original", "cpu_full", "cpu_default", "cpu_compile_full", "cpu_compile", "diffusers_sdpa_compile", "openvino"]
    assert [c.name for c in bm.select(None, "cuda")] == list(bm.DEFAULT_NAMES)
    assert not set(bm.DEFAULT_NAMES) & {"cpu_full", "cpu_default", "cpu_compile_full", "cpu_compile", "openvino"}


def test_skip_reason_names_the_missing_module():
    assert bm.skip_reason(bm.BY_NAME["xformers"], {"xformers": False}) == "xformers is not installed (pip install xformers)"
    assert bm.skip_reason(bm.BY_NAME["xformers"], {"xformers": True}) is None
    assert bm.skip_reason(bm.BY_NAME["original"], {}) is None
    peer = bm.BY_NAME["diffusers_sdpa"]
    assert bm.skip_reason(peer, {"diffusers": True, "transformers": True}) is None
    assert bm.skip_reason(peer, {"diffusers": False, "transformers": False}) == (
        "diffusers and transformers are not installed (pip install diffusers transformers)"
    )


def test_classify_failure():
    oom = "Traceback...\ntorch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB\n"
    assert bm.classify_failure(1, oom) == ("oom", "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB")
    assert bm.classify_failure(1, "x\ntxt2img.py: error: boom\n\n") == ("failed", "txt2img.py: error: boom")
    assert bm.classify_failure(None, "step 3\n") == ("timeout", "step 3")
    assert bm.classify_failure(-9, "") == ("failed", "exit status -9")


def test_summary_figures_and_reference_fallback():
    records = [
        record("original", 1, 1, seconds=8.0), record("original", 1, 2, seconds=9.0), record("original", 1, 3, seconds=8.5),
        record("xformers", 1, 1, "skipped", detail="xformers is not installed"),
        record("mem_efficient_compile", 1, 1, seconds=5.0, peak=3 * 2**30),
        record("mem_efficient_compile", 1, 2, "failed", detail="RuntimeError: boom"),
        record("mem_efficient_compile", 1, 3, seconds=4.0, peak=2 * 2**30),
        record("original", 4, 1, "oom", detail="CUDA out of memory"),
        record("xformers", 4, 1, "skipped", detail="xformers is not installed"),
        record("mem_efficient_compile", 4, 1, seconds=10.0),
    ]
    cells = bm.summarise(records)
    c = cells[("original", 1)]
    assert (c.status, c.median, c.low, c.high, c.timed, c.runs) == ("ok", 8.5, 8.0, 9.0, 3, 3)
    c = cells[("mem_efficient_compile", 1)]
    assert (c.median, c.timed, c.runs, c.peak_memory, c.details) == (4.5, 2, 3, 3 * 2**30, ["RuntimeError: boom"])
    assert cells[("original", 4)].status == "oom"
    assert bm.reference(cells, 1) == "original"  # 2 skipped: 1 is the reference
    assert bm.reference(cells, 4) is None
    assert bm.speedup(cells, "mem_efficient_compile", "original", 1) == pytest.approx(8.5 / 4.5)

    configs = bm.select(["original", "xformers", "mem_efficient_compile"])
    text = bm.markdown_summary(records, configs, [1, 4], {"n_iter": 2, "rounds": 3, "device": "cuda (X)"})
    assert "- device: cuda (X)" in text
    assert "| 1. original, no xFormers | 8.50 (8.00-9.00) | OOM |" in text
    assert "| 2. original + xFormers | skipped | skipped |" in text
    assert "| 5. optimised, mem-efficient + compile | 4.50 (4.00-5.00), 2/3 timed | 10.00 (10.00-10.00) |" in text
    change = f"{(4.5 / 8.5 - 1) * 100:+.1f}% ({8.5 / 4.5:.2f}x)"
    assert f"| 5. optimised, mem-efficient + compile | {change} | n/a |" in text
    assert "| 1. original, no xFormers | reference | OOM |" in text
    memory = text.split("## Peak GPU memory")[1]
    assert "| 5. optimised, mem-efficient + compile | 3.00 | - |" in memory  # GiB, largest of the timed rounds
    assert "| 1. original, no xFormers | - | OOM |" in memory
    assert f"(goal >= 1.6x) | {8.5 / 4.5:.2f}x | n/a |" in text
    assert "- 2. original + xFormers, batch 1, 4: xformers is not installed" in text  # one note for both sizes
    assert "- 5. optimised, mem-efficient + compile, batch 1: RuntimeError: boom" in text
    assert "- 1. original, no xFormers, batch 4: CUDA out of memory" in text


def test_reference_is_configuration_2_when_it_timed():
    records = [record("original", 1, 1, seconds=8.0), record("xformers", 1, 1, seconds=6.0), record("math", 1, 1, seconds=3.0)]
    cells = bm.summarise(records)
    assert bm.reference(cells, 1) == "xformers"
    text = bm.markdown_summary(records, bm.select(["original", "xformers", "math"]), [1], {})
    assert "against 2. original + xFormers" in text
    assert "| 3. optimised, math attention | -50.0% (2.00x) |" in text
    assert "| 1. original, no xFormers | +33.3% (0.75x) |" in text


def test_plot_writes_one_png(tmp_path):
    records = [record("original", 2, 1, seconds=1.0), record("math", 2, 1, "oom", detail="x")]
    path = tmp_path / "plot_bs2.png"
    bm.plot_batch(path, bm.summarise(records), bm.select(["original", "math", "flash"]), 2, "title")
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    assert [p.name for p in tmp_path.iterdir()] == ["plot_bs2.png"]  # no temporary file left


# -- the script's pieces -----------------------------------------------------------------------
def test_runs_of_ours_are_settings_and_the_peers_command_lines(tiny_files, tmp_path):
    args = benchmark.parse_args(["--config", str(tiny_files["config"]), "--ckpt", str(tiny_files["ckpt"]), "--H", "64", "--W", "64",
                                 "--device", "cpu", "--compile-mode", "max-autotune", "--cpu-threads", "1", "--outdir", str(tmp_path)])
    files = {False: (Path("orig.yaml"), Path("orig.ckpt")), True: (Path("native.yaml"), Path("native.ckpt"))}
    run = benchmark.timed_run(args, bm.PlannedRun(4, 1, bm.BY_NAME["mem_efficient_compile"]), files, tmp_path)
    assert run.model == {"config": "native.yaml", "ckpt": "native.ckpt", "device": "cpu", "precision": "autocast", "attention": "sdpa",
                         "disable_flash": True, "disable_math": True, "compile": True, "compile_mode": "max-autotune"}
    assert (run.task, run.n_samples, run.n_iter, run.height, run.width, run.prompt, run.cpu_threads) == ("txt2img", 4, 2, 64, 64, "A photo", 1)
    assert run.sampling == {"sampler": "plms", "steps": 50, "seed": 1} and run.outdir == str(tmp_path)
    ModelSettings(**run.model)  # typed settings, no command line
    run = benchmark.timed_run(args, bm.PlannedRun(1, 1, bm.BY_NAME["original"]), files, tmp_path)
    assert run.model["config"] == "orig.yaml" and run.model["attention"] == "vanilla" and "compile" not in run.model
    run = benchmark.timed_run(args, bm.PlannedRun(1, 1, bm.BY_NAME["cpu_compile_full"]), files, tmp_path)
    assert run.model["precision"] == "full" and run.model["compile"] is True
    cmd = benchmark.peer_command(args, bm.PlannedRun(1, 1, bm.BY_NAME["diffusers_sdpa_compile"]), files, tmp_path)
    assert cmd[1] == str(benchmark.PEER) and "--config orig.yaml" in " ".join(cmd) and "--plms" not in cmd
    assert "--compile --compile_mode max-autotune" in " ".join(cmd) and f"--stats_file {tmp_path / 'stats.json'}" in " ".join(cmd)
    cmd = benchmark.peer_command(args, bm.PlannedRun(1, 1, bm.BY_NAME["openvino"]), files, tmp_path)
    assert cmd[-1] == "--openvino" and "--compile" not in cmd


def test_image_tasks_get_their_family_config_and_sampler(tmp_path):
    args = benchmark.parse_args(["--task", "img2img", "--random-weights", "--outdir", str(tmp_path), "--device", "cpu"])
    assert args.config == ROOT / "configs" / "stable-diffusion" / "v2-inference.yaml"
    assert benchmark.sampler_of("img2img") == "ddim" and benchmark.sampler_of("txt2img") == "plms"
    assert benchmark.default_config("inpaint") == ROOT / "configs" / "stable-diffusion" / "v2-inpainting-inference.yaml"
    assert benchmark.default_config("txt2img") == benchmark.DEFAULT_CONFIG


def tiny_run(tiny_files, outdir: Path, **model) -> timing.TimedRun:
    return timing.TimedRun(model={"config": str(tiny_files["config"]), "ckpt": str(tiny_files["safetensors"]), "device": "cpu", **model},
                           outdir=str(outdir), n_samples=1, n_iter=1, height=64, width=64, sampling={"sampler": "ddim", "steps": 2, "seed": 1})


@pytest.mark.parametrize("task", ["txt2img", "img2img"])
def test_timed_run_of_a_task_from_settings(tiny_files, tmp_path, task):
    """The child's work, in this process: any task, image tasks on a synthetic input picture."""
    run = tiny_run(tiny_files, tmp_path, precision="full")
    run.task = task
    stats = timing.execute(run)
    assert stats["task"] == task and stats["images"] == 1 and stats["seconds"] > 0 and stats["warmup_seconds"] > 0
    assert stats["computes_in"] == "full" and stats["model_settings"]["precision"] == "full"
    assert len(list((tmp_path / "samples").glob("*.png"))) == 1
    assert (tmp_path / "inputs" / "input.png").is_file() == (task != "txt2img")


def test_child_failure_reports_the_error_last(tiny_files, tmp_path):
    run = tiny_run(tiny_files, tmp_path / "run")
    run.model["config"] = str(tmp_path / "missing.yaml")
    returncode, wall, output = timing.run_in_child(run, tmp_path / "log.txt", timeout=300)
    assert returncode == 1
    assert bm.classify_failure(returncode, output) == ("failed", f"GenerationError: --config {tmp_path / 'missing.yaml'}: no such file")


@needs_proc
def test_child_past_the_time_limit_is_killed_with_its_session(tiny_files, tmp_path, monkeypatch):
    """At the limit the child goes, and with it every process of its session (inductor's compile
    workers): none is left holding the environment the child was started with."""
    marker = f"LDM_TEST_RUN={tmp_path}"
    monkeypatch.setenv("LDM_TEST_RUN", str(tmp_path))
    run = tiny_run(tiny_files, tmp_path / "run", compile=True)  # compiling takes far longer than the limit
    returncode, wall, output = timing.run_in_child(run, tmp_path / "log.txt", timeout=4.0)
    assert returncode is None and bm.classify_failure(returncode, output)[0] == "timeout"
    wait_for(lambda: not pids_with_env(marker), timeout=30, what="the end of the child's processes")


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--H", "72"], "multiples of 16"),
        (["--configs", "fast"], "unknown configuration"),
        (["--rounds", "0"], "rounds"),
    ],
)
def test_bad_arguments(tiny_files, extra, message, capsys):
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--config", str(tiny_files["config"]), "--ckpt", str(tiny_files["ckpt"]), "--W", "64", *extra])
    assert message in capsys.readouterr().err


def test_native_mha_config_is_refused(tiny_files, tmp_path, capsys):
    from omegaconf import OmegaConf

    from conftest import tiny_config

    native = tmp_path / "native.yaml"
    OmegaConf.save(tiny_config(native_mha=True), native)
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--config", str(native), "--random-weights"])
    assert "--native-mha" in capsys.readouterr().err


def test_random_checkpoint_is_written_once_with_seeded_weights(tiny_files, tmp_path):
    path = benchmark.random_checkpoint(tiny_files["config"], tmp_path)
    stamp = path.stat().st_mtime_ns
    assert benchmark.random_checkpoint(tiny_files["config"], tmp_path) == path and path.stat().st_mtime_ns == stamp
    load_model_from_config(tiny_files["config"], path)  # strict: every tensor of the model
    # Seeded: another folder gets the same weights (ours and the peer run on identical ones).
    (tmp_path / "other").mkdir()
    other = load_state_dict(benchmark.random_checkpoint(tiny_files["config"], tmp_path / "other"))
    assert all(torch.equal(other[k], v) for k, v in load_state_dict(path).items())


def test_native_mha_files(tiny_files, tmp_path):
    config, ckpt = benchmark.native_mha_files(tiny_files["config"], tiny_files["safetensors"], tmp_path)
    model = load_model_from_config(config, ckpt)
    assert any(isinstance(m, torch.nn.MultiheadAttention) for m in model.modules())
    assert "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.in_proj_weight" in load_state_dict(ckpt)


@needs_proc
def test_run_past_the_time_limit_is_killed_with_its_process_group(tmp_path):
    code = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); print('started', flush=True); time.sleep(60)"
    marker = f"LDM_TEST_RUN={tmp_path}"
    returncode, wall, output = benchmark.execute([sys.executable, "-c", code], tmp_path, 3.0, child_env(LDM_TEST_RUN=str(tmp_path)))
    assert returncode is None and "started" in output
    assert bm.classify_failure(returncode, output) == ("timeout", "started")
    wait_for(lambda: not pids_with_env(marker), timeout=30, what="the end of the run and its sleeper")


def test_outdir_with_results_is_refused(tmp_path):
    (tmp_path / "runs.csv").write_text("old")
    with pytest.raises(SystemExit, match="--force"):
        benchmark.prepare_outdir(tmp_path, force=False)
    assert (tmp_path / "runs.csv").read_text() == "old"
    (tmp_path / "random-weights.safetensors").write_text("kept")
    benchmark.prepare_outdir(tmp_path, force=True)
    assert [p.name for p in tmp_path.iterdir()] == ["random-weights.safetensors"]


# -- one real round ----------------------------------------------------------------------------
CONFIGS = ("original", "xformers", "mem_efficient", "diffusers_sdpa")
BATCH_SIZES = (1, 2)


@pytest.fixture(scope="module")
def bench_run(tiny_files, tmp_path_factory):
    outdir = tmp_path_factory.mktemp("bench") / "out"
    cmd = [sys.executable, str(SCRIPT), "--config", str(tiny_files["config"]), "--ckpt", str(tiny_files["safetensors"]),
           "--device", "cpu", "--rounds", "1", "--steps", "2", "--H", "64", "--W", "64", "--cpu-threads", "1",
           "--batch-sizes", *map(str, BATCH_SIZES), "--configs", *CONFIGS, "--outdir", str(outdir)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=child_env(), timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return outdir, proc


@pytest.mark.slow
def test_benchmark_round_data(bench_run):
    outdir, _ = bench_run
    with open(outdir / "runs.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    data = json.loads((outdir / "runs.json").read_text())
    assert len(rows) == len(data["runs"]) == len(CONFIGS) * len(BATCH_SIZES) * 1
    assert tuple(rows[0]) == bm.FIELDS
    assert [(int(r["batch_size"]), r["configuration"]) for r in rows] == [(b, c) for b in BATCH_SIZES for c in CONFIGS]
    by = {(r["configuration"], int(r["batch_size"])): r for r in rows}
    for b in BATCH_SIZES:
        for name in ("original", "diffusers_sdpa"):  # these run on any CPU
            r = by[(name, b)]
            assert r["status"] == "ok", r
            assert float(r["seconds"]) > 0 and int(r["images"]) == 2 * b and r["device"] == "cpu"
            assert float(r["seconds_per_image"]) == pytest.approx(float(r["seconds"]) / (2 * b))
            run_dir = outdir / "runs" / f"bs{b}" / name / "round01"
            assert len(list((run_dir / "samples").glob("*.png"))) == 2 * b
        if not benchmark.importable("xformers.ops"):
            assert by[("xformers", b)]["status"] == "skipped" and "xformers is not installed" in by[("xformers", b)]["detail"]
        assert all(r["torch"] == torch.__version__ and r["commit"] for r in rows)
    assert data["meta"]["configurations"] == list(CONFIGS) and data["meta"]["batch_sizes"] == list(BATCH_SIZES)


@pytest.mark.slow
def test_benchmark_round_summary_and_plots(bench_run):
    outdir, proc = bench_run
    summary = (outdir / "summary.md").read_text()
    assert summary in proc.stdout  # also shown to the user
    with open(outdir / "runs.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    shown = {"oom": "OOM", "failed": "failed", "skipped": "skipped", "timeout": "timeout"}
    seconds_table = summary.split("## Seconds")[1].split("##")[0]
    for name in CONFIGS:
        label = bm.BY_NAME[name].label
        line = next(line for line in seconds_table.splitlines() if line.startswith(f"| {label} |"))
        cells = [c.strip() for c in line.strip("|").split("|")[1:]]
        assert len(cells) == len(BATCH_SIZES)
        for b, cell in zip(BATCH_SIZES, cells):
            row = next(r for r in rows if r["configuration"] == name and int(r["batch_size"]) == b)
            if row["status"] == "ok":  # one round: median = min = max
                median, low_high = cell.split(" ")
                assert float(median) == pytest.approx(float(row["seconds"]), abs=0.01)
                assert low_high == f"({median}-{median})"
            else:
                assert cell == shown[row["status"]]
                note = next(line for line in summary.splitlines() if line.startswith(f"- {label}, batch ") and row["detail"] in line)
                assert str(b) in note.split(":")[0]
    assert "against 1. original, no xFormers" in summary or "against 2. original + xFormers" in summary
    assert sorted(p.name for p in outdir.glob("*.png")) == [f"plot_bs{b}.png" for b in BATCH_SIZES]
    for b in BATCH_SIZES:
        assert (outdir / f"plot_bs{b}.png").read_bytes()[:8] == PNG_SIGNATURE


def test_benchmark_refuses_to_overwrite_before_writing_anything(tmp_path, monkeypatch):
    (tmp_path / "runs.csv").write_text("old")
    monkeypatch.setattr(benchmark.signal, "signal", lambda *args: None)  # main's SIGTERM handler would outlive the test
    with pytest.raises(SystemExit, match="--force"):
        benchmark.main(["--random-weights", "--outdir", str(tmp_path), "--rounds", "1"])
    assert [p.name for p in tmp_path.iterdir()] == ["runs.csv"] and (tmp_path / "runs.csv").read_text() == "old"
