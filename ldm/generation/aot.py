"""Frozen CPU compilation ahead of time, cached on disk, so that only the first run pays for it.

``torch.compile`` with frozen weights lowers the whole graph again in every new process (inductor's
FX graph cache cannot hold a frozen graph: its oneDNN-prepacked weights do not pickle), about a
minute for the full UNet even with the C++ kernels cached. Here the module is exported
(``torch.export``) and compiled by AOTInductor into a package, weights frozen in, once per model and
call signature; a later run loads the package in seconds. The outputs are those of the
``torch.compile`` path (the same inductor lowering and freezing passes: measured bit for bit on the
full UNet).

A package is reused only for the same model and call: the key hashes the weights (every byte: a
fine-tune differing in one tensor gets its own package), the modules' structure and settings, the
source files of their code and of this package, the torch version, the inputs' shapes and dtypes,
the autocast state, the enabled SDPA backends and the thread count (inductor writes it into its
kernels). Packages are written atomically; the least recently used ones are deleted once the folder
holds more than :data:`MAX_CACHE_BYTES`.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

import ldm
from ldm.fileio import atomic_path

logger = logging.getLogger(__name__)

MAX_CACHE_BYTES = int(float(os.environ.get("LDM_SD2_PACKAGE_CACHE_GB", "20")) * 2**30)
"""Packages beyond this total (the full UNet's is 1.7 GB in bfloat16) are deleted, least recently used
first. ``LDM_SD2_PACKAGE_CACHE_GB`` sets it."""

SIMPLE = (str, int, float, bool, type(None))


class PackagedForward:
    """``module``'s forward, compiled for CPU inference by AOTInductor with ``options`` (freezing):
    one package per call signature, built on the first call with that signature or loaded from
    ``folder``. Call it without gradients; later changes to the weights are not seen."""

    def __init__(self, module: nn.Module, folder: Path, options: dict[str, Any]):
        self.module = module
        self.folder = Path(folder)
        self.options = options
        self.forward = type(module).forward.__get__(module)  # the class's, even once module.forward is replaced
        self.runners: dict[str, Callable[..., Any]] = {}
        self._model_key: str | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if torch.is_grad_enabled():
            raise RuntimeError("a module compiled for CPU inference (frozen weights) must be called under torch.no_grad()")
        kwargs = dict(sorted(kwargs.items()))  # the package's inputs in one order, whatever the caller's
        key = self.key(args, kwargs)
        runner = self.runners.get(key)
        if runner is None:
            runner = self.runners[key] = self.load_or_build(key, args, kwargs)
        return runner(*args, **kwargs)

    @property
    def model_key(self) -> str:
        """Hash of what the compiled code depends on besides the call: computed once (about 1 s per
        1.7 GB of weights)."""
        if self._model_key is None:
            digest = hashlib.sha256()
            for part in model_description(self.module, self.options):
                digest.update(part)
            self._model_key = digest.hexdigest()
        return self._model_key

    def key(self, args: tuple, kwargs: dict) -> str:
        """The package's name for a call with these inputs, under the current autocast and SDPA state."""
        call = repr((
            [describe_input(a) for a in args], [(k, describe_input(v)) for k, v in kwargs.items()],
            torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"), torch.get_num_threads(),
            [getattr(torch.backends.cuda, f"{b}_sdp_enabled")() for b in ("flash", "mem_efficient", "math", "cudnn")],
        ))
        return hashlib.sha256(f"{self.model_key}\n{call}".encode()).hexdigest()[:32]

    def load_or_build(self, key: str, args: tuple, kwargs: dict) -> Callable[..., Any]:
        """The package ``key`` from the folder, else exported with these inputs, compiled and saved."""
        name = type(self.module).__name__
        path = self.folder / f"{name}-{key}.pt2"
        if path.exists():
            try:
                runner = torch._inductor.aoti_load_package(str(path))
                os.utime(path)  # recently used: kept longest
                logger.info("loaded the compiled %s from %s", name, path)
                return runner
            except Exception as error:  # written by another torch build, or damaged: compile it again
                logger.warning("could not load %s (%s): compiling again", path, error)
                path.unlink(missing_ok=True)
        started = time.perf_counter()
        logger.info("compiling %s ahead of time for %s (minutes the first time; later runs load it from %s)",
                    name, ", ".join(describe_input(a) for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), self.folder)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise RuntimeError(f"--compile cannot create its cache folder {self.folder} ({error}): "
                               "set TORCHINDUCTOR_CACHE_DIR to a writable folder") from None
        with atomic_path(path, overwrite=True, suffix=".pt2") as partial:  # AOTInductor wants the suffix
            program = torch.export.export(_Forward(self.module, self.forward), args, kwargs)
            torch._inductor.aoti_compile_and_package(program, package_path=str(partial), inductor_configs=self.options)
        logger.info("compiled %s in %.0f s: %s (%.2f GB)", name, time.perf_counter() - started, path, path.stat().st_size / 1e9)
        evict(self.folder, keep=path)
        return torch._inductor.aoti_load_package(str(path))


class _Forward(nn.Module):
    """``forward`` of ``module`` as a module of its own, for ``torch.export``."""

    def __init__(self, module: nn.Module, forward: Callable[..., Any]):
        super().__init__()
        self.module = module
        self._forward = forward

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._forward(*args, **kwargs)


def describe_input(value: Any) -> str:
    """What of an input the compiled code depends on: a tensor's shape, dtype and device (also inside
    a list or tuple, such as ControlNet residuals); else its value."""
    if isinstance(value, torch.Tensor):
        return f"{value.dtype}{list(value.shape)}@{value.device}"
    if isinstance(value, (list, tuple)):
        return f"{type(value).__name__}[{', '.join(describe_input(v) for v in value)}]"
    return repr(value)


def model_description(module: nn.Module, options: dict[str, Any]) -> Any:
    """Byte strings that, hashed, identify ``module`` compiled with ``options``: versions, the source
    files of its code and of ``ldm``, each submodule's type and simple settings, every tensor."""
    yield repr((torch.__version__, ldm.__version__, sys.version_info[:2], sorted(options.items()))).encode()
    files = set(Path(ldm.__file__).parent.rglob("*.py"))
    for sub in module.modules():
        source = inspect.getsourcefile(type(sub))
        if source:
            files.add(Path(source))
    for file in sorted(files):
        yield file.read_bytes()
    for name, sub in module.named_modules():
        settings = sorted((k, v) for k, v in vars(sub).items() if not k.startswith("_") and isinstance(v, SIMPLE))
        yield repr((name, type(sub).__qualname__, settings)).encode()
    for name, tensor in module.state_dict().items():
        yield repr((name, tensor.dtype, tuple(tensor.shape))).encode()
        yield memoryview(tensor.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy())


def evict(folder: Path, keep: Path, limit: int | None = None) -> None:
    """Delete the least recently used packages in ``folder`` beyond ``limit`` bytes, never ``keep``."""
    limit = MAX_CACHE_BYTES if limit is None else limit
    packages = sorted((p for p in folder.glob("*.pt2") if not p.name.startswith(".")), key=lambda p: p.stat().st_mtime)  # not those being written
    total = sum(p.stat().st_size for p in packages)
    for old in packages:
        if total <= limit:
            break
        if old != keep:
            total -= old.stat().st_size
            old.unlink(missing_ok=True)
            logger.info("deleted the least recently used compiled package %s (cache over %.0f GB)", old, limit / 2**30)
