"""Atomic file writing: a temporary file (or folder) beside the target, renamed into place only when
complete, so that an interrupted write never leaves a partial file or clobbers an existing one."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Read once at import: os.umask can only be read by setting it, which would race with threads.
_UMASK = _read_umask()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, overwrite: bool = False, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path to write (a hidden name ending in ``suffix``, for writers that insist
    on one); on success it becomes ``path``.

    Without ``overwrite`` an existing ``path`` raises FileExistsError, also when another
    process creates it meanwhile (the rename is a no-clobber hard link where the file system
    has them). The file gets the usual permissions (0666 less the umask), not mkstemp's 0600.
    """
    path = Path(path)
    if not overwrite and path.exists():
        raise FileExistsError(f"{path} exists; refusing to overwrite it")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"output folder does not exist: {path.parent}")
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)
        yield tmp
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise FileExistsError(f"{path} exists; refusing to overwrite it") from None
            except OSError:  # file systems without hard links
                if path.exists():
                    raise FileExistsError(f"{path} exists; refusing to overwrite it") from None
                os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a hidden folder beside ``path`` to fill; on success it becomes ``path``, replacing an
    existing one only with ``overwrite``; on failure it is removed and ``path`` left as it was."""
    path = Path(path)
    if not overwrite and path.exists():
        raise FileExistsError(f"{path} exists; refusing to overwrite it")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"output folder does not exist: {path.parent}")
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp's is 0700
        if path.exists():  # overwrite: the old one steps aside first, and goes once the new one is in place
            old = tmp.with_suffix(".old")
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        else:
            os.rename(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def write_bytes(path: str | os.PathLike, data: bytes, overwrite: bool = False) -> None:
    with atomic_path(path, overwrite) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str, overwrite: bool = False) -> None:
    with atomic_path(path, overwrite) as tmp:
        tmp.write_text(text, encoding="utf-8")
