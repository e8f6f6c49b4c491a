"""Atomic file writing: a temporary file beside the target, renamed into place only when complete,
so that an interrupted write never leaves a partial file or clobbers an existing one."""

from __future__ import annotations

import contextlib
import os
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


def write_bytes(path: str | os.PathLike, data: bytes, overwrite: bool = False) -> None:
    with atomic_path(path, overwrite) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str, overwrite: bool = False) -> None:
    with atomic_path(path, overwrite) as tmp:
        tmp.write_text(text, encoding="utf-8")
