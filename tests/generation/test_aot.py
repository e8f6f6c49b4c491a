"""ldm/generation/aot.py: --compile's packages on the CPU. A second process (a new PackagedForward)
loads the package instead of compiling; the key tells apart everything the compiled code depends on
(weights, shapes, dtypes, autocast, SDPA backends, threads) and nothing else; damaged packages are
compiled again; packages are written whole and the cache is bounded. A small convolution-and-linear
network keeps each compilation to seconds; the tiny UNet's compiled outputs are tested in test_speed.py.

Tolerance: compiled float32 against eager, 1e-5 of the output's scale (fusion reorders float32 roundings)."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn

from conftest import rel_max
from ldm.generation import aot, speed


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(4, 8), nn.SiLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 5)).eval()


@pytest.fixture()
def folder(tmp_path):
    return tmp_path / "aoti"


def packaged(net: nn.Module, folder) -> aot.PackagedForward:
    return aot.PackagedForward(net, folder, speed.inductor_options("cpu"))


def forbid_compiling(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("compiled although a package was there")

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", refuse)


@pytest.mark.slow
def test_a_second_process_loads_the_package_instead_of_compiling(folder, monkeypatch, caplog):
    net, x = small_net(), torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        expected = net(x)
        assert rel_max(packaged(net, folder)(x), expected) <= 1e-5
        (package,) = folder.iterdir()  # written whole: no partial file left
        assert package.name.startswith("Sequential-")
        forbid_compiling(monkeypatch)
        with caplog.at_level(logging.INFO, logger="ldm.generation.aot"):
            again = packaged(copy.deepcopy(net), folder)  # the same model in a new process
            assert rel_max(again(x), expected) <= 1e-5
        assert "loaded the compiled Sequential" in caplog.text
        assert list(folder.glob("*.pt2")) == [package]


@pytest.mark.slow
def test_compile_module_replaces_forward_with_a_package(tmp_path, monkeypatch):
    monkeypatch.setenv(speed.CACHE_ENV, str(tmp_path / "cache"))
    net, x = small_net(), torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        expected = net(x)
        compiled = speed.compile_module(copy.deepcopy(net), "cpu")
        assert isinstance(compiled.forward, aot.PackagedForward)
        assert rel_max(compiled(x), expected) <= 1e-5
    assert len(list((tmp_path / "cache" / "aoti").glob("Sequential-*.pt2"))) == 1
    with pytest.raises(RuntimeError, match="torch.no_grad"):
        compiled(x)


def test_the_key_follows_what_the_compiled_code_depends_on(folder):
    net = small_net()
    forward = packaged(net, folder)
    x = torch.randn(2, 3, 6, 6)
    base = forward.key((x,), {})
    assert forward.key((torch.randn(2, 3, 6, 6),), {}) == base  # the values are inputs, not constants
    residuals = {"control": [torch.randn(2, 8), torch.randn(2, 4)]}  # a list of tensors (ControlNet residuals)
    assert forward.key((x,), {"control": [torch.randn(2, 8), torch.randn(2, 4)]}) == forward.key((x,), residuals)
    assert forward.key((x,), {"control": [torch.randn(2, 8)]}) != forward.key((x,), residuals)
    assert forward.key((x[:1],), {}) != base
    assert forward.key((x.double(),), {}) != base
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert forward.key((x,), {}) != base
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        assert forward.key((x,), {}) != base
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)
        assert forward.key((x,), {}) != base
    finally:
        torch.set_num_threads(threads)
    changed = copy.deepcopy(net)
    with torch.no_grad():
        changed[4].bias[0] += 1e-3  # one weight of a fine-tune
    assert packaged(changed, folder).key((x,), {}) != base
    assert packaged(copy.deepcopy(net), folder).key((x,), {}) == base
    assert aot.PackagedForward(net, folder, speed.inductor_options("cpu", "max-autotune")).key((x,), {}) != base
    settings = copy.deepcopy(net)
    settings[1].eps = 1e-3  # a module's setting
    assert packaged(settings, folder).key((x,), {}) != base


@pytest.mark.slow
def test_a_damaged_package_is_compiled_again(folder, caplog):
    net, x = small_net(), torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        packaged(net, folder)(x)
        (package,) = folder.glob("*.pt2")
        package.write_bytes(b"not a package")
        with caplog.at_level(logging.WARNING, logger="ldm.generation.aot"):
            assert rel_max(packaged(net, folder)(x), net(x)) <= 1e-5
    assert "compiling again" in caplog.text
    assert package.stat().st_size > 1000


def test_a_failed_compilation_leaves_no_file(folder, monkeypatch):
    def fail(program, package_path, inductor_configs):
        open(package_path, "wb").write(b"half a package")
        raise RuntimeError("compiler crashed")

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", fail)
    with torch.no_grad(), pytest.raises(RuntimeError, match="compiler crashed"):
        packaged(small_net(), folder)(torch.randn(2, 3, 6, 6))
    assert list(folder.iterdir()) == []


def test_an_unusable_cache_folder_is_named(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with torch.no_grad(), pytest.raises(RuntimeError, match=r"cannot create its cache folder .*TORCHINDUCTOR_CACHE_DIR"):
        packaged(small_net(), blocker / "aoti")(torch.randn(2, 3, 6, 6))


def test_the_least_recently_used_packages_go_first(tmp_path):
    import os

    sizes = {"a": 400, "b": 300, "c": 200, "d": 100}
    for age, (name, size) in enumerate(sizes.items()):
        path = tmp_path / f"{name}.pt2"
        path.write_bytes(b"x" * size)
        os.utime(path, (1000 + age, 1000 + age))  # a oldest
    (tmp_path / ".e.pt2.x1y2.pt2").write_bytes(b"x" * 1000)  # another process's package being written (fileio.atomic_path)
    aot.evict(tmp_path, keep=tmp_path / "a.pt2", limit=650)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".e.pt2.x1y2.pt2", "a.pt2", "d.pt2"]
