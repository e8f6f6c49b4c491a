"""The UNet's transformer blocks and the one seam through which all their attention runs.

Two weight layouts exist, chosen by ``use_native_mha`` in the UNet config:

* original layout (``to_q``/``to_k``/``to_v``/``to_out.0``): :class:`CrossAttention`, whose
  kernel is a run-time choice among :data:`IMPLEMENTATIONS` (see :func:`set_attention_implementation`;
  the default, ``sdpa``, can be changed with the ``LDM_ATTENTION`` environment variable);
* native layout: :class:`NativeMHAttention`, a ``torch.nn.MultiheadAttention``. Self-attention
  holds one packed ``in_proj_weight`` [3C, C]; cross-attention (keys and values from the
  text context, whose width differs from C) holds ``q_proj_weight`` [C, C],
  ``k_proj_weight`` and ``v_proj_weight`` [C, context_dim]. Both hold ``in_proj_bias`` [3C],
  which the original layout lacks: it is zero after conversion, and
  ``tools/convert_native_mha.py --reverse`` refuses to drop a non-zero one.
  ``out_proj.weight``/``out_proj.bias`` are ``to_out.0.weight``/``to_out.0.bias``
  (conversion: :mod:`ldm.native_mha`).

:func:`sdpa_backends` restricts the SDPA kernels for a run. User documentation: docs/attention.md.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ldm.modules.diffusionmodules.util import checkpoint, zero_module

try:
    import xformers.ops as xops
except ImportError:  # optional extra
    xops = None

IMPLEMENTATIONS = ("vanilla", "sdpa", "xformers")
"""Kernels for the original layout: the original matmul-softmax-matmul, PyTorch's fused
``scaled_dot_product_attention``, and xFormers' memory-efficient attention."""

DEFAULT_IMPLEMENTATION = os.environ.get("LDM_ATTENTION", "sdpa")

# The original code computes attention scores in float32 even under autocast unless told otherwise.
ATTN_PRECISION = os.environ.get("ATTN_PRECISION", "fp32")


def check_implementation(name: str) -> str:
    """Validate an implementation name; xFormers must be installed to be chosen."""
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {name!r}; choose one of {IMPLEMENTATIONS}")
    if name == "xformers" and xops is None:
        raise RuntimeError(
            "attention implementation 'xformers' requested but xFormers is not installed "
            "(pip install xformers, or choose 'sdpa')"
        )
    return name


def _default_implementation() -> str:
    try:
        return check_implementation(DEFAULT_IMPLEMENTATION)
    except (ValueError, RuntimeError) as e:
        raise type(e)(f"LDM_ATTENTION={DEFAULT_IMPLEMENTATION!r}: {e}") from None


def _vanilla(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """The original computation: scores by matmul, softmax, weighted sum; heads folded into batch."""
    b, n, inner = q.shape
    d = inner // heads
    q, k, v = (t.reshape(b, -1, heads, d).transpose(1, 2).reshape(b * heads, -1, d) for t in (q, k, v))
    scale = d**-0.5
    if ATTN_PRECISION == "fp32":
        # As the original, turn off CUDA's autocast only (float16 scores overflow): under CPU
        # autocast the scores stay bfloat16, which has float32's range.
        with torch.autocast(device_type="cuda", enabled=False):
            sim = (q.float() @ k.float().transpose(1, 2)) * scale
    else:
        sim = (q @ k.transpose(1, 2)) * scale
    out = sim.softmax(dim=-1).to(v.dtype) @ v
    return out.reshape(b, heads, n, d).transpose(1, 2).reshape(b, n, inner)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """PyTorch's fused attention; the (batch, heads, tokens, dim) views keep the last dim
    contiguous, which the flash and memory-efficient kernels require."""
    b, n, inner = q.shape
    d = inner // heads
    q, k, v = (t.reshape(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).reshape(b, n, inner)


def _xformers(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """xFormers' memory-efficient attention on (batch, tokens, heads, dim)."""
    b, n, inner = q.shape
    d = inner // heads
    q, k, v = (t.reshape(b, -1, heads, d).contiguous() for t in (q, k, v))
    return xops.memory_efficient_attention(q, k, v).reshape(b, n, inner)


_KERNELS = {"vanilla": _vanilla, "sdpa": _sdpa, "xformers": _xformers}


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, implementation: str) -> torch.Tensor:
    """Multi-head attention of (batch, tokens, heads * dim_head) projections."""
    return _KERNELS[implementation](q, k, v, heads)


class CrossAttention(nn.Module):
    """Attention in the original weight layout; self-attention when ``context`` is None."""

    def __init__(self, query_dim: int, context_dim: int | None = None, heads: int = 8, dim_head: int = 64, dropout: float = 0.0):
        super().__init__()
        inner_dim = heads * dim_head
        context_dim = query_dim if context_dim is None else context_dim
        self.heads = heads
        self.implementation = _default_implementation()
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        out = attention(self.to_q(x), self.to_k(context), self.to_v(context), self.heads, self.implementation)
        return self.to_out(out)


class NativeMHAttention(nn.MultiheadAttention):
    """The same attention as :class:`CrossAttention` through ``nn.MultiheadAttention``.

    Batch-first, with ``need_weights=False`` so that PyTorch runs ``scaled_dot_product_attention``
    rather than materialising the attention weights. On CUDA, self-attention takes
    ``nn.MultiheadAttention``'s fused fast path (packed projection, then SDPA). On other devices
    that fast path computes the full score matrix, and the module's general path transposes the
    batch-first input into a strided sequence-first view, which the projections then multiply as
    a batched matmul against a copy of the weight expanded over every token (under CPU autocast
    that made the UNet about 7x slower). So off CUDA the general path's function is called
    directly on contiguous sequence-first tensors: one GEMM per projection, the same arithmetic.
    """

    def __init__(self, query_dim: int, context_dim: int | None = None, heads: int = 8, dim_head: int = 64, dropout: float = 0.0):
        if heads * dim_head != query_dim:
            raise ValueError(f"native MHA needs heads * dim_head == query_dim, got {heads} * {dim_head} != {query_dim}")
        if dropout:
            raise ValueError("the native MHA layout supports dropout=0 only")
        super().__init__(query_dim, heads, bias=True, kdim=context_dim, vdim=context_dim, batch_first=True)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        if x.is_cuda:
            context = x if context is None else context
            return super().forward(x, context, context, need_weights=False)[0]
        return self._sequence_first(x, context)

    def _sequence_first(self, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        """``nn.MultiheadAttention``'s general path on contiguous (tokens, batch, channels) tensors."""
        query = x.transpose(0, 1).contiguous()
        key = query if context is None else context.transpose(0, 1).contiguous()
        separate = not self._qkv_same_embed_dim
        out = F.multi_head_attention_forward(
            query, key, key, self.embed_dim, self.num_heads, self.in_proj_weight, self.in_proj_bias,
            self.bias_k, self.bias_v, self.add_zero_attn, self.dropout, self.out_proj.weight, self.out_proj.bias,
            training=self.training, need_weights=False, use_separate_proj_weight=separate,
            q_proj_weight=self.q_proj_weight, k_proj_weight=self.k_proj_weight, v_proj_weight=self.v_proj_weight,
        )[0]
        return out.transpose(0, 1)


class GEGLU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, dim_out: int | None = None, mult: int = 4, glu: bool = False, dropout: float = 0.0):
        super().__init__()
        inner_dim = int(dim * mult)
        project_in = GEGLU(dim, inner_dim) if glu else nn.Sequential(nn.Linear(dim, inner_dim), nn.GELU())
        self.net = nn.Sequential(project_in, nn.Dropout(dropout), nn.Linear(inner_dim, dim_out or dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Self-attention, cross-attention to the context, and a GEGLU feed-forward, each pre-norm."""

    def __init__(
        self,
        dim: int,
        n_heads: int,
        d_head: int,
        dropout: float = 0.0,
        context_dim: int | None = None,
        gated_ff: bool = True,
        checkpoint: bool = True,
        disable_self_attn: bool = False,
        use_native_mha: bool = False,
    ):
        super().__init__()
        attn_cls = NativeMHAttention if use_native_mha else CrossAttention
        self.disable_self_attn = disable_self_attn
        self.attn1 = attn_cls(dim, context_dim if disable_self_attn else None, n_heads, d_head, dropout)
        self.ff = FeedForward(dim, dropout=dropout, glu=gated_ff)
        self.attn2 = attn_cls(dim, context_dim, n_heads, d_head, dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.checkpoint = checkpoint

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        return checkpoint(self._forward, (x, context), self.checkpoint)

    def _forward(self, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        x = self.attn1(self.norm1(x), context if self.disable_self_attn else None) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of a feature map, conditioned on a context sequence."""

    def __init__(
        self,
        in_channels: int,
        n_heads: int,
        d_head: int,
        depth: int = 1,
        dropout: float = 0.0,
        context_dim: int | None = None,
        disable_self_attn: bool = False,
        use_linear: bool = False,
        use_checkpoint: bool = True,
        use_native_mha: bool = False,
    ):
        super().__init__()
        inner_dim = n_heads * d_head
        self.norm = nn.GroupNorm(32, in_channels, eps=1e-6, affine=True)
        self.use_linear = use_linear
        if use_linear:
            self.proj_in = nn.Linear(in_channels, inner_dim)
            self.proj_out = nn.Linear(inner_dim, in_channels)
        else:
            self.proj_in = nn.Conv2d(in_channels, inner_dim, 1)
            self.proj_out = nn.Conv2d(inner_dim, in_channels, 1)
        zero_module(self.proj_out)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(
                inner_dim,
                n_heads,
                d_head,
                dropout=dropout,
                context_dim=context_dim,
                disable_self_attn=disable_self_attn,
                checkpoint=use_checkpoint,
                use_native_mha=use_native_mha,
            )
            for _ in range(depth)
        )

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        b, _, h, w = x.shape
        x_in = x
        x = self.norm(x)
        if not self.use_linear:
            x = self.proj_in(x)
        x = x.flatten(2).transpose(1, 2)
        if self.use_linear:
            x = self.proj_in(x)
        for block in self.transformer_blocks:
            x = block(x, context)
        if self.use_linear:
            x = self.proj_out(x)
        # Back to a contiguous NCHW map: the bare view would be channels-last, and that layout
        # would spread through the UNet, making every convolution re-layout its weights.
        x = x.transpose(1, 2).reshape(b, -1, h, w).contiguous()
        if not self.use_linear:
            x = self.proj_out(x)
        return x + x_in


def set_attention_implementation(model: nn.Module, name: str) -> int:
    """Choose the kernel of every original-layout attention in ``model``; returns how many were set."""
    check_implementation(name)
    modules = [m for m in model.modules() if isinstance(m, CrossAttention)]
    for m in modules:
        m.implementation = name
    return len(modules)


SDPA_BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "mem_efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}


@contextlib.contextmanager
def sdpa_backends(disable_flash: bool = False, disable_mem_efficient: bool = False, disable_math: bool = False) -> Iterator[None]:
    """Restrict ``scaled_dot_product_attention`` to the backends not disabled, for a whole run.

    With nothing disabled PyTorch's own choice (cuDNN included) is left alone.
    """
    disabled = {"flash": disable_flash, "mem_efficient": disable_mem_efficient, "math": disable_math}
    if not any(disabled.values()):
        yield
        return
    enabled = [backend for name, backend in SDPA_BACKENDS.items() if not disabled[name]]
    if not enabled:
        raise ValueError("all SDPA backends (flash, mem_efficient, math) are disabled: enable at least one")
    with sdpa_kernel(enabled):
        yield
