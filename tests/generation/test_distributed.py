"""Generation split over processes (ldm.generation.distributed): the job's batches, the batch seed
rule and who runs what; then true ``torchrun`` runs of 2 CPU processes on gloo (marked slow),
compared byte for byte with one-process runs of the same code on the same device type, a resumed job,
and ranks that fail or are killed mid-run.

One-process references run in-process (conftest sets 1 thread, as torchrun's OMP_NUM_THREADS=1):
float results can depend on the thread count, never on the number of processes.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, assert_valid_pngs, child_env, free_port, needs_proc, pids_with_env, samples, wait_for
from ldm.generation import main
from ldm.generation.distributed import JobSettings, Plan, batch_seed, job_units
from ldm.generation.errors import UsageError

SCRIPT = ROOT / "scripts" / "txt2img.py"
FAST = ["--H", "64", "--W", "64", "--steps", "2", "--precision", "full"]
PROMPTS = ["a red circle", "a blue square", "a green triangle", "a yellow circle", "a red square"]
# 5 prompts in batches of 2, twice: 6 batches (sizes 2, 2, 1, 2, 2, 1), 10 images.
JOB = ["--n_samples", "2", "--n_iter", "2"]
FAILURE_BOUND_S = 90  # a rank's failure stops the others well within this (torchrun's agent, the store flag)


def model_flags(tiny_files) -> list[str]:
    return ["--config", str(tiny_files["config"]), "--ckpt", str(tiny_files["safetensors"])]


def torchrun(args: list[str], port: int, script: Path = SCRIPT) -> subprocess.Popen:
    """``torchrun --nproc_per_node 2`` of ``script`` on the CPU (gloo), as a subprocess."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port), str(script), *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env(), cwd=ROOT,
                            start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    """Kill what is left of a torchrun run: the agent and its ranks (its own session)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)


def finished(proc: subprocess.Popen, timeout: float = 240) -> tuple[int, str]:
    """The exit status and output of ``proc``; killed (and the test failed) past ``timeout`` seconds."""
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        stop(proc)
    return proc.returncode, out + err


# -- the job, the seed rule, the shares -------------------------------------------------------------


def test_batch_seed_is_a_fixed_32_bit_hash():
    # The rule is part of the file format of a job: changing it changes every batch-rule image.
    assert [batch_seed(42, 0), batch_seed(42, 1), batch_seed(43, 0), batch_seed(0, 10**6)] == [
        3500217437, 2519300318, 2604460496, 3777701101]
    # Neighbouring seeds share no batch (as seed + index would), and every value is a valid --seed.
    seeds = [batch_seed(s, i) for s in range(40, 45) for i in range(100)]
    assert len(set(seeds)) == len(seeds)
    assert all(0 <= batch_seed(s, i) < 2**32 for s in (0, 42, 2**32 - 1) for i in (0, 1, 10**6))


def test_units_number_batches_and_images_in_the_one_process_order():
    units = job_units([["a", "b"], ["c"]], n_iter=2)
    assert [(u.index, u.iteration, u.number, u.prompts, u.first_image) for u in units] == [
        (0, 0, 0, ("a", "b"), 0), (1, 0, 1, ("c",), 2), (2, 1, 0, ("a", "b"), 3), (3, 1, 1, ("c",), 5)]  # fmt: skip


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_shares_split_the_batches_still_to_do(world_size):
    units = job_units([["a", "b"], ["c", "d"], ["e"]], n_iter=3)
    plan = Plan("batch", 0, existing=frozenset({0, 1, 2, 7}))  # batch 0 done, batch 1 half done, batch 4 half done
    shares = [plan.share(units, rank, world_size) for rank in range(world_size)]
    done = [u.index for share in shares for u in share]
    assert sorted(done) == [u.index for u in units if u.index != 0] and len(set(done)) == len(done)
    assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_the_stream_rule_is_kept_for_one_process_only():
    assert JobSettings().resolved_seed_mode(1) == "stream"
    assert JobSettings().resolved_seed_mode(2) == "batch"
    assert JobSettings(skip_existing=True).resolved_seed_mode(1) == "batch"
    assert JobSettings(seed_mode="batch").resolved_seed_mode(1) == "batch"
    for world_size, skip in ((2, False), (1, True)):
        with pytest.raises(UsageError, match="--seed_mode stream cannot be used"):
            JobSettings(seed_mode="stream", skip_existing=skip).resolved_seed_mode(world_size)


def test_a_batch_rule_batch_is_the_stream_of_its_batch_seed(tiny_files, tmp_path):
    """txt2img draws nothing before its first batch, so batch i of a batch-rule run is what a
    one-batch stream run with ``--seed batch_seed(seed, i)`` gives: the PNG's batch_seed reruns it."""
    flags = [*model_flags(tiny_files), *FAST, "--n_samples", "1"]
    assert main([*flags, "--outdir", str(tmp_path / "batch"), "--n_iter", "2", "--seed_mode", "batch"]) == 0
    second = samples(tmp_path / "batch")[1]
    with Image.open(second) as image:
        assert image.text["seed_mode"] == "batch" and image.text["batch_seed"] == str(batch_seed(42, 1))
        want = np.asarray(image.convert("RGB"))
    assert main([*flags, "--outdir", str(tmp_path / "one"), "--n_iter", "1", "--seed", str(batch_seed(42, 1))]) == 0
    with Image.open(samples(tmp_path / "one")[0]) as image:
        np.testing.assert_array_equal(np.asarray(image.convert("RGB")), want)


def test_skip_existing_refuses_files_of_another_job(tiny_files, tmp_path, capsys):
    flags = [*model_flags(tiny_files), *FAST, "--n_samples", "1", "--outdir", str(tmp_path), "--skip_existing"]
    assert main([*flags, "--n_iter", "2"]) == 0
    assert main([*flags, "--n_iter", "2"]) == 0  # everything there: nothing to do
    assert "nothing to do" in capsys.readouterr().out
    assert main([*flags, "--n_iter", "3", "--steps", "4"]) == 1
    assert "00000.png was not written by this job (steps '2', this job '4')" in capsys.readouterr().err
    assert main([*flags, "--seed_mode", "stream"]) == 2


# -- two processes against one ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def jobs(tiny_files, tmp_path_factory) -> dict[str, Path]:
    """The job four ways. One process: ``--skip_existing`` into an empty folder (the reference) and
    ``--seed_mode batch`` into a folder holding a foreign 00002.png. Two processes (torchrun):
    ``--skip_existing`` into a folder holding 6 of the reference's files (a job that died part-way:
    batches 0 and 3 done, 1 and 4 half done), and ``--seed_mode batch`` like the one-process run."""
    root = tmp_path_factory.mktemp("distributed")
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    flags = [*model_flags(tiny_files), *FAST, *JOB, "--from-file", str(prompts)]
    for name in ("one_batch", "two_batch"):
        (root / name / "samples").mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(root / name / "samples" / "00002.png")
    assert main([*flags, "--outdir", str(root / "one_skip"), "--skip_existing"]) == 0
    assert main([*flags, "--outdir", str(root / "one_batch"), "--seed_mode", "batch"]) == 0
    (root / "two_skip" / "samples").mkdir(parents=True)
    for i in (0, 1, 2, 5, 6, 8):
        shutil.copy2(root / "one_skip" / "samples" / f"{i:05}.png", root / "two_skip" / "samples")
    before = {p.name: p.stat() for p in samples(root / "two_skip")}
    timed = ["--time_file", str(root / "time.txt"), "--stats_file", str(root / "stats.json")]
    runs = {  # both at once: much of a run is starting its processes
        "two_skip": torchrun([*flags, "--outdir", str(root / "two_skip"), "--skip_existing", "--stats_file", str(root / "skip.json")], free_port()),
        "two_batch": torchrun([*flags, "--outdir", str(root / "two_batch"), *timed], free_port()),
    }
    for name, (status, output) in {name: finished(proc) for name, proc in runs.items()}.items():
        assert status == 0, output
        (root / f"{name}.log").write_text(output)
    return {"root": root, "before": before}


@pytest.mark.slow
def test_two_processes_write_the_same_files_as_one(jobs):
    root = jobs["root"]
    one, two = samples(root / "one_batch"), samples(root / "two_batch")
    assert [p.name for p in two] == [f"{i:05}.png" for i in range(2, 13)]  # after the foreign 00002.png, no gaps
    assert [p.name for p in one] == [p.name for p in two]
    for a, b in zip(one, two):
        assert a.read_bytes() == b.read_bytes(), b.name  # pixels and metadata
    assert (root / "one_batch" / "grid-0000.png").read_bytes() == (root / "two_batch" / "grid-0000.png").read_bytes()
    assert not list((root / "two_batch").rglob("*.tmp"))


@pytest.mark.slow
def test_rank_0_writes_the_summary_with_aggregate_and_per_rank_figures(jobs):
    root = jobs["root"]
    stats = json.loads((root / "stats.json").read_text())
    assert stats["world_size"] == 2 and stats["seed_mode"] == "batch" and stats["images"] == 10
    ranks = stats["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1] and [r["batches"] for r in ranks] == [3, 3]
    assert sum(r["images"] for r in ranks) == 10 and all(r["images_per_second"] > 0 for r in ranks)
    assert stats["seconds"] == pytest.approx(max(r["seconds"] for r in ranks))
    assert stats["images_per_second"] == pytest.approx(10 / stats["seconds"])
    assert float((root / "time.txt").read_text()) == pytest.approx(stats["seconds"], abs=1e-5)
    log = (root / "two_batch.log").read_text()
    assert "by 2 processes" in log and "images/s in all" in log and log.count("grid-0000.png") == 1


@pytest.mark.slow
def test_a_resumed_job_writes_only_what_is_missing_under_another_world_size(jobs):
    root = jobs["root"]
    reference, resumed = samples(root / "one_skip"), samples(root / "two_skip")
    assert [p.name for p in reference] == [f"{i:05}.png" for i in range(10)]
    assert [p.name for p in resumed] == [p.name for p in reference]
    for a, b in zip(reference, resumed):
        assert a.read_bytes() == b.read_bytes(), b.name
    for name, stat in jobs["before"].items():  # the files already there were not written again
        now = (root / "two_skip" / "samples" / name).stat()
        assert (now.st_ino, now.st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns)
    stats = json.loads((root / "skip.json").read_text())
    # Batches 1 (images 2, 3), 2 (4), 4 (7, 8) and 5 (9) run; the half-done ones write only their missing file.
    assert stats["skipped_images"] == 6 and stats["job_images"] == 10 and stats["images"] == 6
    assert sum(r["batches"] for r in stats["ranks"]) == 4


@pytest.mark.slow
def test_demo_model_two_processes_write_the_same_files_as_one(tmp_path):
    flags = ["--steps", "4", "--n_samples", "1", "--n_iter", "2", "--precision", "full", "--prompt", "a blue triangle"]
    assert main([*flags, "--outdir", str(tmp_path / "one"), "--seed_mode", "batch"]) == 0
    status, output = finished(torchrun([*flags, "--outdir", str(tmp_path / "two")], free_port()))
    assert status == 0, output
    one, two = samples(tmp_path / "one"), samples(tmp_path / "two")
    assert len(one) == 2 and [p.name for p in one] == [p.name for p in two]
    for a, b in zip(one, two):
        assert a.read_bytes() == b.read_bytes()


# -- failures -------------------------------------------------------------------------------------------

FAULTY = '''
import os, sys
from ldm.generation import main
from ldm.generation.pipeline import Pipeline

calls, original = [], Pipeline.__call__

def failing(self, prompts):
    calls.append(1)
    if os.environ["RANK"] == "1" and len(calls) == 2:
        raise RuntimeError("injected failure")
    return original(self, prompts)

Pipeline.__call__ = failing
sys.exit(main(sys.argv[1:], "txt2img"))
'''


@pytest.mark.slow
def test_a_failing_rank_stops_the_others_with_its_reason(tiny_files, tmp_path):
    script = tmp_path / "faulty_txt2img.py"
    script.write_text(FAULTY)
    out = tmp_path / "out"
    flags = [*model_flags(tiny_files), *FAST, "--n_samples", "1", "--n_iter", "200", "--outdir", str(out)]
    status, output = finished(torchrun(flags, free_port(), script=script), timeout=FAILURE_BOUND_S + 120)
    assert status != 0
    assert "[rank 0/2] txt2img.py: error: stopped because rank 1 failed: RuntimeError: injected failure" in output, output
    written = samples(out)
    assert 1 <= len(written) < 100  # rank 0 stopped early; rank 1 wrote its first image
    assert_valid_pngs(written)
    assert not list(out.rglob("*.tmp"))


@pytest.mark.slow
@needs_proc
def test_a_killed_rank_stops_the_others_in_bounded_time_and_the_job_resumes(tiny_files, tmp_path):
    out = tmp_path / "out"
    flags = [*model_flags(tiny_files), *FAST, "--n_samples", "1", "--n_iter", "60", "--outdir", str(out), "--skip_existing"]
    port = free_port()
    proc = torchrun(flags, port)
    try:
        wait_for(lambda: len(samples(out)) >= 4, timeout=300, alive=lambda: proc.poll() is None, what="4 images")
        (pid,) = pids_with_env(f"MASTER_PORT={port}", "RANK=1", "LOCAL_RANK=1")
        os.kill(pid, signal.SIGKILL)
    except BaseException:
        stop(proc)
        raise
    status, output = finished(proc, timeout=FAILURE_BOUND_S)  # a rank left waiting forever fails here
    # Rank 0 stops either way, whichever comes first: torchrun's SIGTERM, or gloo seeing its peer gone.
    stopped = r"\[rank 0/2\] txt2img\.py: (terminated by SIGTERM \(images written so far are complete|error: [^\n]*: a process stopped without reporting)"
    assert status != 0 and re.search(stopped, output), output
    written = samples(out)
    assert 4 <= len(written) < 60
    assert_valid_pngs(written)
    # The same job, resumed by one process, generates only the missing images.
    assert main([*flags, "--stats_file", str(tmp_path / "stats.json")]) == 0
    assert [p.name for p in samples(out)] == [f"{i:05}.png" for i in range(60)]
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["images"] == 60 - len(written) and stats["skipped_images"] == len(written)


def test_ranks_that_read_different_jobs_are_refused():
    from ldm.generation.distributed import check_same_job, job_digest

    units = job_units([["a red circle"]], 2)
    same = job_digest(units, {"seed": "42"})
    check_same_job([same, same])
    other = job_digest(job_units([["a blue circle"]], 2), {"seed": "42"})
    with pytest.raises(Exception, match="rank 1 read another job than rank 0"):
        check_same_job([same, other])
