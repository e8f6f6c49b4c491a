import os
import stat

import pytest

from ldm.fileio import atomic_folder, atomic_path, write_bytes, write_text


def test_never_overwrites_unless_asked(tmp_path):
    path = tmp_path / "00000.png"
    write_bytes(path, b"first")
    with pytest.raises(FileExistsError):
        write_bytes(path, b"second")
    assert path.read_bytes() == b"first"
    write_text(path, "third", overwrite=True)
    assert path.read_text() == "third"


def test_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(ZeroDivisionError):
        with atomic_path(tmp_path / "broken.png") as tmp:
            tmp.write_bytes(b"partial")
            1 / 0
    assert list(tmp_path.iterdir()) == []


def test_usual_permissions_and_missing_folder(tmp_path):
    path = tmp_path / "out.txt"
    write_text(path, "x")
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask
    with pytest.raises(FileNotFoundError, match="output folder does not exist"):
        write_text(tmp_path / "missing" / "out.txt", "x")


def test_folders_are_written_whole_or_not_at_all(tmp_path):
    target = tmp_path / "model"
    with atomic_folder(target) as tmp:
        (tmp / "unet").mkdir()
        (tmp / "unet" / "config.json").write_text("{}")
    assert (target / "unet" / "config.json").read_text() == "{}"
    assert stat.S_IMODE(target.stat().st_mode) == 0o777 & ~_umask()
    with pytest.raises(FileExistsError):
        with atomic_folder(target):
            pass
    with pytest.raises(ZeroDivisionError):  # a failed overwrite leaves the old folder as it was
        with atomic_folder(target, overwrite=True) as tmp:
            (tmp / "partial").write_text("x")
            1 / 0
    assert [p.name for p in tmp_path.iterdir()] == ["model"] and [p.name for p in target.iterdir()] == ["unet"]
    with atomic_folder(target, overwrite=True) as tmp:
        (tmp / "new").write_text("y")
    assert [p.name for p in target.iterdir()] == ["new"] and [p.name for p in tmp_path.iterdir()] == ["model"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
