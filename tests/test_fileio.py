import os
import stat

import pytest

from ldm.fileio import atomic_path, write_bytes, write_text


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
