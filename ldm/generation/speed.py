"""Speed choices of a run that depend on the machine: the precision the CPU computes fastest, weights
held in bfloat16 rather than cast at every call, and ``torch.compile`` for frozen inference weights
with inductor's on-disk caches reused from one run to the next.

* Precision. The original scripts autocast on the CPU too (bfloat16). That pays only where the CPU
  computes bfloat16 natively (AMX, AVX-512 BF16, Arm BF16): elsewhere oneDNN emulates it and float32
  is faster. So the default ``autocast`` becomes float32 on such CPUs, said once in the log; ``--bf16``
  still forces bfloat16. The capability comes from torch's own queries (:func:`cpu_has_native_bf16`,
  monkeypatchable in tests).
* Held weights. Under autocast every linear and convolution casts its float32 weight to bfloat16 at
  each call (autocast's cache keeps the casts only of parameters that require grad, and only inside
  one autocast region). Holding those weights in bfloat16 gives bit-identical results, halves their
  memory and removes the casts: :func:`hold_weights`.
* Compilation on the CPU (the UNet and the VAE decoder: :func:`compile_model`): inductor with
  ``freezing`` (weights become constants: casts folded, oneDNN weight prepacking for linear and
  convolution), compiled ahead of time by AOTInductor into packages kept on disk
  (:mod:`ldm.generation.aot`), because ``torch.compile`` would lower a frozen graph again in every
  process (its FX graph cache cannot hold one): full UNet, measured, about a minute per run that way
  against seconds to load a package. Packages and inductor's other caches live in a stable per-user
  folder (:func:`use_compile_cache`). ``--compile_backend openvino`` compiles with OpenVINO instead
  (:data:`BACKENDS`).

User documentation: docs/benchmark.md ("On the CPU").
"""

from __future__ import annotations

import logging
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

logger = logging.getLogger(__name__)

CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"
_told_fp32 = False


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 in hardware: AMX or AVX-512 BF16 on x86 (torch's CPU
    capability queries), Arm's BF16 extension elsewhere (oneDNN's own check). oneDNN's check alone is
    not enough on x86: it accepts any AVX-512 CPU and emulates bfloat16 there, slower than float32."""
    try:
        if platform.machine().lower() in ("x86_64", "amd64", "i386", "i686", "x86"):
            return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a PyTorch without these queries: assume the slow case
        return False


def cpu_description() -> str:
    """The CPU's name and the bfloat16 features that decide its default precision, from torch."""
    caps = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    flags = ", ".join(f"{k} {'yes' if caps.get(k) else 'no'}" for k in ("avx512_bf16", "amx_bf16") if k in caps)
    name = caps.get("cpu_name") or platform.processor() or platform.machine()
    return f"{name} ({os.cpu_count()} logical CPUs; {flags or 'features unknown'}; native bf16 {'yes' if cpu_has_native_bf16() else 'no'})"


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """The precision a run computes in: ``precision`` ("full", "autocast" or "bf16"), except that the
    default "autocast" is "full" on a CPU without native bfloat16 (logged once per process)."""
    global _told_fp32
    if torch.device(device).type != "cpu" or precision != "autocast" or cpu_has_native_bf16():
        return precision
    if not _told_fp32:
        logger.info("this CPU has no native bfloat16 (AMX or AVX-512 BF16): computing in float32, which is faster "
                    "here than the original's bfloat16 autocast (--bf16 forces bfloat16)")
        _told_fp32 = True
    return "full"


HELD_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.MultiheadAttention)
"""Layers whose weights autocast casts to its lower precision at every call (nn.MultiheadAttention:
its projection weights). Norms and embeddings are not among them: they keep float32."""


def hold_weights(module: nn.Module, dtype: torch.dtype = torch.bfloat16) -> int:
    """Store the weights and biases of ``module``'s :data:`HELD_LAYERS` in ``dtype``, for runs under
    autocast to ``dtype``, which computes these layers in ``dtype`` anyway (bit-identical results,
    no cast per call, half the memory). Returns how many tensors changed dtype."""
    changed = 0
    for layer in module.modules():
        if isinstance(layer, HELD_LAYERS):
            for p in layer.parameters(recurse=False):
                if p.is_floating_point() and p.dtype != dtype:
                    p.data = p.data.to(dtype)
                    changed += 1
    return changed


def compile_cache_dir() -> Path:
    """Inductor's on-disk cache: ``TORCHINDUCTOR_CACHE_DIR`` when set, else a stable per-user folder,
    ``$XDG_CACHE_HOME/ldm-sd2/torchinductor`` (``~/.cache/...``), which survives reboots unlike
    PyTorch's default under /tmp."""
    chosen = os.environ.get(CACHE_ENV)
    if chosen and not _is_torch_default(chosen):
        return Path(chosen)
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "ldm-sd2" / "torchinductor"


def _is_torch_default(folder: str) -> bool:
    """Whether ``folder`` is PyTorch's own default, which importing ``torch._dynamo`` writes into
    ``TORCHINDUCTOR_CACHE_DIR`` when it is unset: then the user chose nothing."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    return os.path.abspath(folder) == os.path.abspath(default_cache_dir())


def use_compile_cache() -> Path:
    """Point inductor at :func:`compile_cache_dir` (unless the user chose a folder) and keep its FX
    graph cache and AOT autograd cache on (unless switched off by their environment variables);
    call before the first compilation of the process. Returns the folder."""
    folder = compile_cache_dir()
    os.environ[CACHE_ENV] = str(folder)
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    if "TORCHINDUCTOR_FX_GRAPH_CACHE" not in os.environ:
        inductor_config.fx_graph_cache = True
    if "TORCHINDUCTOR_AUTOGRAD_CACHE" not in os.environ and hasattr(functorch_config, "enable_autograd_cache"):
        functorch_config.enable_autograd_cache = True
    return folder


def inductor_options(device: torch.device | str, mode: str | None = None) -> dict[str, Any] | None:
    """``torch.compile`` options for inference on ``device``: on the CPU, ``mode``'s own options (with
    max-autotune: the CPU GEMM templates) plus ``freezing``. None elsewhere: there ``mode`` is used as is."""
    if torch.device(device).type != "cpu":
        return None
    from torch._inductor import list_mode_options

    options = {k: v for k, v in list_mode_options(mode or "default").items() if not k.startswith("triton.")}  # CUDA graphs
    return {**options, "freezing": True}


def package_dir() -> Path:
    """Where :func:`compiled_forward` keeps its compiled packages on the CPU: ``aoti`` in :func:`compile_cache_dir`."""
    return compile_cache_dir() / "aoti"


def compiled_forward(module: nn.Module, device: torch.device | str, mode: str | None = None) -> Callable[..., Any]:
    """``module`` compiled for inference on ``device`` (see :func:`inductor_options`), as a callable;
    ``module`` itself is left as it is.

    On the CPU the weights are frozen into code compiled ahead of time and kept on disk
    (:class:`ldm.generation.aot.PackagedForward`): call it without gradients (as generation does),
    and do not change the weights afterwards (a change is not seen)."""
    use_compile_cache()
    options = inductor_options(device, mode)
    if options is None:
        return torch.compile(module, mode=mode or "default")
    from ldm.generation.aot import PackagedForward

    return PackagedForward(module, package_dir(), options)


def compile_module(module: nn.Module, device: torch.device | str, mode: str | None = None, backend: str = "inductor") -> nn.Module:
    """Compile ``module``'s forward in place for inference on ``device`` with ``backend`` (see
    :data:`BACKENDS`; inductor: :func:`compiled_forward`)."""
    return BACKENDS[backend].compile(module, device, mode)


def compile_inductor(module: nn.Module, device: torch.device | str, mode: str | None = None) -> nn.Module:
    """Inductor: ``module.compile`` on CUDA; on the CPU frozen and ahead of time (:func:`compiled_forward`)."""
    if torch.device(device).type != "cpu":
        use_compile_cache()
        module.compile(mode=mode or "default")
    else:
        module.forward = compiled_forward(module, device, mode)
    return module


def compile_openvino(module: nn.Module, device: torch.device | str, mode: str | None = None) -> nn.Module:
    """OpenVINO's torch.compile backend (:mod:`ldm.generation.openvino`), imported only when chosen."""
    from ldm.generation import openvino

    return openvino.compile_openvino(module, device, mode)


@dataclass(frozen=True)
class Backend:
    """A ``--compile_backend``: how it compiles a module, and the precision it must be fed (None: the run's)."""

    compile: Callable[[nn.Module, torch.device | str, str | None], nn.Module]
    precision: str | None = None


BACKENDS = {"inductor": Backend(compile_inductor), "openvino": Backend(compile_openvino, precision="full")}


def compile_model(net: nn.Module, device: torch.device | str, mode: str | None = None, step_cache: Any = None,
                  backend: str = "inductor") -> None:
    """What ``--compile`` compiles of a loaded model: the UNet (with ``step_cache``, a
    :class:`~ldm.modules.diffusionmodules.deepcache.StepCache`, its two steps); on the CPU also the VAE
    decoder, a tenth to a fifth of a CPU generation, which freezing makes about 20% faster (measured:
    2.18 s -> 1.79 s per 256x256 image, bfloat16) for about 30 s more of compilation, once per model
    and size. On CUDA the decoder is left eager as in the original write-up (not measured there)."""
    for unet in step_cache.steps() if step_cache is not None else (net.model.diffusion_model,):
        compile_module(unet, device, mode, backend)
    decoder = getattr(net, "latent_decoder", None) or getattr(net.first_stage_model, "decoder", None)
    if torch.device(device).type == "cpu" and decoder is not None:
        compile_module(decoder, device, mode, backend)
