"""``--compile_backend openvino``: the UNet and the VAE decoder compiled by OpenVINO's ``torch.compile``
backend (the ``openvino`` package) instead of inductor, on the CPU.

OpenVINO chooses its own inference precision (bfloat16 on CPUs with AVX-512 BF16 or AMX, its
``INFERENCE_PRECISION_HINT``), so it is fed float32: a run with this backend computes in "full"
precision as far as PyTorch is concerned, and the log says what OpenVINO ran in. OpenVINO's backend
falls back to inductor, silently, when it cannot convert a graph; here that is an error naming the
module, so that a timing labelled OpenVINO is OpenVINO's. Every process converts again: OpenVINO's
on-disk model cache keeps the weights out of the cached model (inputs at every call, not constants),
and a run from it was measured at twice the time (BENCHMARKS.md).
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Any, Callable

import torch
from torch import nn

from ldm.generation.errors import GenerationError

logger = logging.getLogger(__name__)
_told_precision = False


def inference_precision() -> str:
    """The precision OpenVINO's CPU plugin computes in on this CPU (e.g. "bf16", "f32")."""
    import openvino

    hint = openvino.Core().get_property("CPU", "INFERENCE_PRECISION_HINT")
    return hint.get_type_name() if hasattr(hint, "get_type_name") else str(hint)


def openvino_backend(name: str) -> Callable[..., Any]:
    """A ``torch.compile`` backend: OpenVINO's, through AOT autograd (its other path, tracing again
    with fake tensors, fails on this PyTorch's symbolic shapes), raising instead of falling back."""
    from openvino.frontend.pytorch.torchdynamo import backend as ov_backend
    from torch._decomp import get_decompositions
    from torch._dynamo.backends.common import aot_autograd

    # No model_caching: measured, a run from its cache took 122 s against 67 s converted afresh (512x512, PLMS 10).
    options = {"device": "CPU", "model_caching": False, "aot_autograd": True}
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
        raise GenerationError("--compile_backend openvino runs on the CPU (--device cpu)")
    if importlib.util.find_spec("openvino") is None:
        raise GenerationError("--compile_backend openvino needs the openvino package: pip install openvino")
    if not _told_precision:
        logger.info("OpenVINO computes in %s on this CPU (its own choice; it is fed float32)", inference_precision())
        _told_precision = True
    module.compile(backend=openvino_backend(type(module).__name__), dynamic=False)
    return module
