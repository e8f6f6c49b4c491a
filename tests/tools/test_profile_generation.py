"""tools/profile_generation.py on the CPU with the tiny model: the printed table names every
component, its shares add up to the whole generation, its figures are positive and consistent
with the profiler's own counts, and --json and --trace hold the same run."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
from torch.autograd import DeviceType

from conftest import ROOT, load_script

TOOL = ROOT / "tools" / "profile_generation.py"


tool = load_script("tools/profile_generation.py")


def table_rows(out: str) -> dict[str, list[str]]:
    """The Markdown table's rows by first cell (header and separator left out)."""
    rows = {}
    for line in out.splitlines():
        if line.startswith("| ") and not line.startswith("| component"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows


def test_table_and_json(tiny_files, tmp_path, capsys):
    folder = tmp_path
    argv = [
        "--config", str(tiny_files["config"]), "--ckpt", str(tiny_files["safetensors"]), "--device", "cpu",
        "--H", "64", "--W", "64", "--steps", "2", "--n_samples", "1", "--precision", "full",
        "--json", str(folder / "profile.json"), "--trace", str(folder / "trace.json"),
    ]
    assert tool.main(argv) == 0
    rows = table_rows(capsys.readouterr().out)
    components = ["text encoder", "UNet", "VAE decode", "host overhead"]
    assert set(rows) == {*components, "- of which attention", "total"}
    seconds = {c: float(rows[c][0]) for c in components}
    shares = {c: float(rows[c][1].rstrip("%")) for c in components}
    assert all(s > 0 for s in seconds.values()), seconds
    assert all(s > 0 for s in shares.values()), shares
    assert math.isclose(sum(shares.values()), 100.0, abs_tol=0.3)  # rounding of four one-decimal shares
    total = float(rows["total"][0])
    assert math.isclose(sum(seconds.values()), total, rel_tol=1e-3, abs_tol=4e-4)  # four-decimal rounding
    # On the CPU a component's seconds are its ranges' wall time; the prompt encoded (the empty prompt's
    # encoding is kept from the warm-up), 2 guided UNet calls, 1 decode.
    assert [rows[c][3] for c in components[:3]] == ["1", "2", "1"]
    attention = float(rows["- of which attention"][0])
    assert 0 < attention < seconds["UNet"]

    summary = json.loads((folder / "profile.json").read_text())
    assert [r["component"] for r in summary["components"]] == components
    for r in summary["components"]:
        assert r["seconds"] == pytest.approx(seconds[r["component"]], abs=6e-5)
        assert 100 * r["share"] == pytest.approx(shares[r["component"]], abs=0.06)
    assert sum(r["share"] for r in summary["components"]) == pytest.approx(1.0)
    assert summary["wall_seconds"] == pytest.approx(total, abs=6e-5)
    assert summary["device_busy_seconds"] is None
    assert summary["unet_attention_seconds"] == pytest.approx(attention, abs=6e-5)
    unet = summary["components"][1]["seconds"]
    assert summary["unet_attention_share_of_unet"] == pytest.approx(summary["unet_attention_seconds"] / unet)
    assert summary["settings"]["steps"] == 2 and summary["settings"]["sampler"] == "ddim"

    trace = json.loads((folder / "trace.json").read_text())
    names = {e.get("name") for e in trace["traceEvents"]}
    assert {"text encoder", "UNet", "VAE decode"} <= names


def test_existing_output_refused_before_loading(tiny_files, tmp_path, capsys):
    existing = tmp_path / "profile.json"
    existing.write_text("keep")
    argv = ["--config", str(tiny_files["config"]), "--ckpt", str(tiny_files["safetensors"]), "--device", "cpu",
            "--json", str(existing)]
    assert tool.main(argv) == 1
    assert "exists; pass --force" in capsys.readouterr().err
    assert existing.read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["profile.json"]


def test_attention_unknown_when_the_unet_is_opaque():
    """A UNet compiled ahead of time is one call without attention ops under it: its attention is
    unknown (None, "n/a"), not zero seconds."""
    def event(name, seconds):
        return SimpleNamespace(name=name, device_type=DeviceType.CPU, cpu_time_total=seconds * 1e6, cpu_children=[])

    events = [event("text encoder", 0.1), event("UNet", 1.0), event("UNet", 1.0), event("VAE decode", 0.5)]
    summary = tool.summarize(events, wall=2.7, on_device=False)
    assert summary["unet_attention_seconds"] is None and summary["unet_attention_share_of_unet"] is None
    rows = table_rows(tool.markdown(summary))
    assert rows["- of which attention"][:2] == ["n/a", "not visible (compiled ahead of time)"]
    assert float(rows["UNet"][0]) == pytest.approx(2.0)
    assert float(rows["host overhead"][0]) == pytest.approx(0.1)
