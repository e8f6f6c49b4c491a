"""``--compile_backend openvino``: the UNet and the VAE decoder compiled by OpenVINO's ``torch.compile``
backend (the ``openvino`` package) instead of inductor, on the CPU.

OpenVINO chooses its own inference precision (bfloat16 on CPUs with AVX-512 BF16 or AMX, its
``INFERENCE_PRECISION_HINT``), so it is fed float32: a run with this backend computes in "full"
precision as far as PyTorch is concerned, and the log says what OpenVINO ran in. OpenVINO's backend
falls back to inductor, silently, when it cannot convert a graph; here that is an error naming the
module, so that a timing labelled OpenVINO is OpenVINO's. Converted models are cached on disk
(``openvino`` in the compile cache folder), so later runs skip the conversion.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch
from torch import nn

logger = logging.getLogger(__name__)
_told_precision = False


def inference_precision() -> str:
    """The precision OpenVINO's CPU plugin computes in on this CPU (e.g. "bf16", "f32")."""
    import openvino

    return str(openvino.Core().get_property("CPU", "INFERENCE_PRECISION_HINT"))


def openvino_backend(name: str, cache_dir: str) -> Callable[..., Any]:
    """A ``torch.compile`` backend: OpenVINO's, through AOT autograd (its other path, tracing again
    with fake tensors, fails on this PyTorch's symbolic shapes), raising instead of falling back."""
    from openvino.frontend.pytorch.torchdynamo import backend as ov_backend
    from torch._decomp import get_decompositions
    from torch._dynamo.backends.common import aot_autograd

    options = {"device": "CPU", "model_caching": True, "cache_dir": cache_dir, "aot_autograd": True}
    decompositions = get_decompositions(ov_backend._get_decompositions(options) + ov_backend.get_inf_decomposition_list()
                                        + ov_backend.get_aot_decomposition_list())

    def convert(graph: torch.fx.GraphModule, example_inputs: list) -> Callable[..., Any]:
        ov_backend.openvino_options = options  # what its converter reads on the AOT path
        compiled = ov_backend.fx_openvino(graph, example_inputs, options)
        # fx_openvino returns its own closure, or inductor's compiled graph when conversion failed.
        if not getattr(compiled, "__qualname__", "").startswith("fx_openvino."):
            raise RuntimeError(f"OpenVINO could not convert the {name} (its backend would have run inductor instead); "
                               "run --compile without --compile_backend openvino")
        return compiled

    return aot_autograd(fw_compiler=convert, bw_compiler=convert, decompositions=decompositions)


def compile_openvino(module: nn.Module, device: torch.device | str, mode: str | None = None) -> nn.Module:
    """Compile ``module`` in place with OpenVINO (CPU only; ``mode`` is inductor's and not used)."""
    global _told_precision
    if torch.device(device).type != "cpu":
        raise RuntimeError("--compile_backend openvino runs on the CPU (--device cpu)")
    try:
        import openvino.torch  # noqa: F401  (registers the backend's decompositions)
    except ImportError:
        raise RuntimeError("--compile_backend openvino needs the openvino package: pip install openvino") from None
    from ldm.generation.speed import compile_cache_dir

    if not _told_precision:
        logger.info("OpenVINO computes in %s on this CPU (its own choice; it is fed float32)", inference_precision())
        _told_precision = True
    module.compile(backend=openvino_backend(type(module).__name__, str(compile_cache_dir() / "openvino")), dynamic=False)
    return module
