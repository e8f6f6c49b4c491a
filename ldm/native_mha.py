"""Converting UNet attention weights between the original and the native-MHA layout.

The original layout (:class:`ldm.modules.attention.CrossAttention`) holds, under each
``...attn1.``/``...attn2.`` prefix, ``to_q.weight``, ``to_k.weight``, ``to_v.weight`` (no biases)
and ``to_out.0.weight``/``to_out.0.bias``. The native layout
(:class:`ldm.modules.attention.NativeMHAttention`, a ``torch.nn.MultiheadAttention``) holds:

* self-attention (keys and values as wide as the queries): ``in_proj_weight`` = the
  concatenation ``[to_q; to_k; to_v]``, shape [3C, C];
* cross-attention (keys and values from a context of another width):
  ``q_proj_weight`` [C, C], ``k_proj_weight`` and ``v_proj_weight`` [C, context_dim];
* both: ``in_proj_bias`` [3C], which the original lacks, all zeros after conversion (in the
  weights' dtype), and ``out_proj.weight``/``out_proj.bias`` = ``to_out.0.weight``/``.bias``.

Converting back splits and renames the same tensors, so a round trip is bit-exact; a non-zero
``in_proj_bias`` (a fine-tuned native model) cannot be expressed in the original layout and is
refused. Every other tensor, ``model_ema.*`` included, passes through untouched.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping

import torch
from tqdm.auto import tqdm

from ldm.checkpoint import CheckpointError, load_state_dict, save_state_dict

logger = logging.getLogger(__name__)

ORIGINAL = "original"
NATIVE = "native"
LAYOUT_NAMES = {ORIGINAL: "original", NATIVE: "native-MHA"}

_ORIGINAL_SUFFIXES = ("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight", "to_out.0.bias")
_PACKED_SUFFIXES = ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias")
_SEPARATE_SUFFIXES = ("q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias")
_MARKERS = {"to_q.weight": ORIGINAL, "in_proj_weight": NATIVE, "q_proj_weight": NATIVE}
_ATTENTION_NAMES = ("attn1.", "attn2.")
# Relative difference between the layouts' outputs above which --verify fails: float32
# attention on a few tokens agrees to ~1e-7.
VERIFY_TOLERANCE = 1e-5


class ConversionError(CheckpointError):
    """A state dict that cannot be converted (incomplete, mixed, or not expressible)."""


class AlreadyConverted(ConversionError):
    """The input is already in the requested layout."""


@dataclass
class ConversionReport:
    """What a conversion did: module counts, untouched tensors, and the --verify result."""

    source_layout: str
    target_layout: str
    self_attention: int = 0
    cross_attention: int = 0
    passed_through: int = 0
    max_abs_diff: float | None = None
    max_rel_diff: float | None = None
    dropped_entries: list[str] = field(default_factory=list)

    def summary(self) -> str:
        src, dst = LAYOUT_NAMES[self.source_layout], LAYOUT_NAMES[self.target_layout]
        if self.target_layout == NATIVE:
            packed = "to_q/to_k/to_v -> in_proj_weight [3C, C]"
            separate = "to_q/to_k/to_v -> q_proj_weight/k_proj_weight/v_proj_weight"
            tail = " (+ zero in_proj_bias), to_out.0 -> out_proj"
        else:
            packed = "in_proj_weight [3C, C] -> to_q/to_k/to_v"
            separate = "q_proj_weight/k_proj_weight/v_proj_weight -> to_q/to_k/to_v"
            tail = " (zero in_proj_bias dropped), out_proj -> to_out.0"
        lines = [
            f"{src} layout -> {dst} layout",
            f"  {self.self_attention} self-attention modules: {packed}{tail}",
            f"  {self.cross_attention} cross-attention modules: {separate}{tail}",
            f"  {self.passed_through} other tensors passed through unchanged",
        ]
        if self.max_abs_diff is not None:
            lines.append(
                f"  verify: max |difference| between the layouts' outputs {self.max_abs_diff:.3g} "
                f"(relative {self.max_rel_diff:.3g}) over {self.modules} attention modules, float32"
            )
        if self.dropped_entries:
            lines.append(f"  not tensors, not written: {', '.join(self.dropped_entries)}")
        return "\n".join(lines)

    @property
    def modules(self) -> int:
        return self.self_attention + self.cross_attention


def _attention_prefix(key: str) -> tuple[str, str] | None:
    """``(prefix, layout)`` when ``key`` is the marker tensor of a UNet attention module."""
    if key.startswith("model_ema."):
        return None
    for suffix, layout in _MARKERS.items():
        if key.endswith(suffix):
            prefix = key[: -len(suffix)]
            if prefix.endswith(_ATTENTION_NAMES):
                return prefix, layout
    return None


def attention_modules(keys) -> dict[str, str]:
    """Every UNet attention module (``...attn1.``/``...attn2.`` prefix) and its layout."""
    found: dict[str, str] = {}
    for key in keys:
        hit = _attention_prefix(key)
        if hit:
            found[hit[0]] = hit[1]
    return found


def detect_layout(keys) -> str:
    """:data:`ORIGINAL` or :data:`NATIVE`; a state dict with neither or both is an error."""
    modules = attention_modules(keys)
    layouts = set(modules.values())
    if not layouts:
        raise ConversionError(
            "no UNet attention tensors found (neither ...attn1.to_q.weight nor ...attn1.in_proj_weight): "
            "is this a Stable Diffusion UNet checkpoint?"
        )
    if len(layouts) > 1:
        example = {layout: next(p for p, lo in modules.items() if lo == layout) for layout in layouts}
        raise ConversionError(
            f"the checkpoint mixes layouts: {example[ORIGINAL]}to_q.weight is original, "
            f"{example[NATIVE]} is native-MHA"
        )
    return layouts.pop()


def _module_keys(prefix: str, layout: str, keys) -> tuple[str, ...]:
    if layout == ORIGINAL:
        return tuple(prefix + s for s in _ORIGINAL_SUFFIXES)
    suffixes = _PACKED_SUFFIXES if prefix + "in_proj_weight" in keys else _SEPARATE_SUFFIXES
    return tuple(prefix + s for s in suffixes)


def _check_module(prefix: str, expected: tuple[str, ...], keys, optional: tuple[str, ...] = ()) -> None:
    missing = [k for k in expected if k not in keys and k not in optional]
    extra = sorted(k for k in keys if k.startswith(prefix) and k not in expected)
    if missing or extra:
        detail = "; ".join(([f"missing {missing}"] if missing else []) + ([f"unexpected {extra}"] if extra else []))
        raise ConversionError(f"attention module {prefix[:-1]} is not in a convertible form: {detail}")


def _to_native(prefix: str, t: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    q, k, v = t[prefix + "to_q.weight"], t[prefix + "to_k.weight"], t[prefix + "to_v.weight"]
    if q.ndim != 2 or q.shape[0] != q.shape[1]:
        raise ConversionError(
            f"{prefix}to_q.weight has shape {tuple(q.shape)}: nn.MultiheadAttention needs heads * dim_head == "
            "query_dim (a square query projection)"
        )
    if k.shape != v.shape or k.shape[0] != q.shape[0] or not q.dtype == k.dtype == v.dtype:
        raise ConversionError(
            f"{prefix}: to_q/to_k/to_v do not fit together (shapes {tuple(q.shape)}, {tuple(k.shape)}, "
            f"{tuple(v.shape)}; dtypes {q.dtype}, {k.dtype}, {v.dtype})"
        )
    out = {}
    if k.shape[1] == q.shape[1]:  # keys and values as wide as the queries: nn.MultiheadAttention packs them
        out[prefix + "in_proj_weight"] = torch.cat([q, k, v])
    else:
        out[prefix + "q_proj_weight"] = q
        out[prefix + "k_proj_weight"] = k
        out[prefix + "v_proj_weight"] = v
    out[prefix + "in_proj_bias"] = q.new_zeros(3 * q.shape[0])  # in the weights' dtype
    out[prefix + "out_proj.weight"] = t[prefix + "to_out.0.weight"]
    out[prefix + "out_proj.bias"] = t[prefix + "to_out.0.bias"]
    return out


def _to_original(prefix: str, t: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    bias = t.get(prefix + "in_proj_bias")
    if bias is not None and torch.count_nonzero(bias):
        raise ConversionError(
            f"{prefix}in_proj_bias is not zero (max |value| {bias.abs().max().item():.3g}): the original layout "
            "has no input-projection bias, so converting back would change the model's outputs. "
            "This checkpoint was trained or fine-tuned in the native layout; keep using the *_native_mha.yaml config."
        )
    if prefix + "in_proj_weight" in t:
        # Clones, not views: each tensor gets its own storage, as in the original file.
        q, k, v = (c.clone() for c in t[prefix + "in_proj_weight"].chunk(3))
    else:
        q, k, v = (t[prefix + name] for name in ("q_proj_weight", "k_proj_weight", "v_proj_weight"))
    return {
        prefix + "to_q.weight": q,
        prefix + "to_k.weight": k,
        prefix + "to_v.weight": v,
        prefix + "to_out.0.weight": t[prefix + "out_proj.weight"],
        prefix + "to_out.0.bias": t[prefix + "out_proj.bias"],
    }


@torch.no_grad()
def attention_difference(
    original: Mapping[str, torch.Tensor], native: Mapping[str, torch.Tensor], prefix: str, tokens: int = 16, seed: int = 0
) -> tuple[float, float]:
    """Max absolute and relative difference between one module's outputs in both layouts.

    The original layout runs the original computation (``vanilla``), the native one
    ``nn.MultiheadAttention``, both in float32 on the same random input (and random context
    for cross-attention). Head count: C // 64 as in SD2 where it divides, else one head.
    """
    from ldm.modules.attention import CrossAttention, NativeMHAttention

    q = original[prefix + "to_q.weight"]
    dim, context_dim = q.shape[1], original[prefix + "to_k.weight"].shape[1]
    heads = dim // 64 if dim % 64 == 0 else 1
    cross = None if context_dim == dim else context_dim
    strip = {k[len(prefix):]: v.float() for k, v in original.items() if k.startswith(prefix)}
    strip_native = {k[len(prefix):]: v.float() for k, v in native.items() if k.startswith(prefix)}
    with torch.device("meta"):
        ref = CrossAttention(dim, cross, heads, dim // heads)
        nat = NativeMHAttention(dim, cross, heads, dim // heads)
    ref.load_state_dict(strip, assign=True)
    nat.load_state_dict(strip_native, assign=True)
    ref.implementation = "vanilla"
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, tokens, dim, generator=gen)
    context = None if cross is None else torch.randn(1, tokens // 2 + 1, context_dim, generator=gen)
    expected = ref.eval()(x, context)
    diff = (nat.eval()(x, context) - expected).abs().max().item()
    return diff, diff / max(expected.abs().max().item(), 1e-12)


def convert_state_dict(
    state: Mapping[str, torch.Tensor], target: str = NATIVE, verify: bool = False, progress: bool = False
) -> tuple[dict[str, torch.Tensor], ConversionReport]:
    """``state`` with its UNet attention converted to the ``target`` layout, and a report.

    Tensors that are not converted are the same objects as in ``state`` (no copy); key order
    is kept, a module's new tensors taking its place. ``verify`` compares every converted
    module's outputs in both layouts (:func:`attention_difference`) and raises
    :class:`ConversionError` beyond :data:`VERIFY_TOLERANCE`. Raises :class:`AlreadyConverted`
    when ``state`` is already in ``target``.
    """
    if target not in LAYOUT_NAMES:
        raise ValueError(f"target layout must be {ORIGINAL!r} or {NATIVE!r}, got {target!r}")
    keys = list(state.keys())
    key_set = set(keys)
    source = detect_layout(keys)
    modules = attention_modules(keys)
    if source == target:
        raise AlreadyConverted(
            f"the checkpoint is already in the {LAYOUT_NAMES[target]} layout ({len(modules)} attention modules)"
        )
    members: dict[str, list[str]] = {}
    for prefix in modules:
        expected = _module_keys(prefix, source, key_set)
        _check_module(prefix, expected, key_set, optional=(prefix + "in_proj_bias",))
        members[prefix] = [k for k in expected if k in key_set]
    owner = {k: prefix for prefix, ks in members.items() for k in ks}
    report = ConversionReport(source, target)
    out: dict[str, torch.Tensor] = {}
    done: set[str] = set()
    max_abs = max_rel = 0.0
    for key in tqdm(keys, desc=f"to {LAYOUT_NAMES[target]} layout", unit="tensor", disable=not progress):
        prefix = owner.get(key)
        if prefix is None:
            out[key] = state[key]
            report.passed_through += 1
            continue
        if prefix in done:
            continue
        done.add(prefix)
        tensors = {k: state[k] for k in members[prefix]}
        converted = _to_native(prefix, tensors) if target == NATIVE else _to_original(prefix, tensors)
        out.update(converted)
        packed = (prefix + "in_proj_weight") in (converted if target == NATIVE else tensors)
        if packed:
            report.self_attention += 1
        else:
            report.cross_attention += 1
        if verify:
            pair = (tensors, converted) if target == NATIVE else (converted, tensors)
            diff, rel = attention_difference(*pair, prefix)
            max_abs, max_rel = max(max_abs, diff), max(max_rel, rel)
            if rel > VERIFY_TOLERANCE:
                raise ConversionError(
                    f"verification failed for {prefix[:-1]}: the layouts' outputs differ by {diff:.3g} "
                    f"(relative {rel:.3g} > {VERIFY_TOLERANCE})"
                )
    if verify:
        report.max_abs_diff, report.max_rel_diff = max_abs, max_rel
    logger.info("converted %d attention modules to the %s layout", report.modules, LAYOUT_NAMES[target])
    return out, report


def to_native(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` (original layout) in the native-MHA layout."""
    return convert_state_dict(state, NATIVE)[0]


def to_original(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` (native-MHA layout) back in the original layout, bit for bit."""
    return convert_state_dict(state, ORIGINAL)[0]


class _SafetensorsSource(Mapping):
    """The tensors of an open safetensors file, read one by one when asked for (memory-mapped)."""

    def __init__(self, handle):
        self._handle = handle
        self._keys = list(handle.keys())

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._handle.get_tensor(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


@contextlib.contextmanager
def open_checkpoint(path: str | os.PathLike) -> Iterator[tuple[Mapping[str, torch.Tensor], dict[str, str], list[str]]]:
    """``(tensors, safetensors metadata, names of non-tensor entries)`` of a checkpoint, lazily.

    safetensors files are opened with ``safe_open`` and read tensor by tensor; pickles are
    loaded memory-mapped where their format allows (``weights_only=True`` either way), so a
    multi-gigabyte checkpoint is never held twice. Anything else goes to
    :func:`ldm.checkpoint.load_state_dict`, which loads it or raises :class:`CheckpointError`.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            handle = safe_open(path, framework="pt", device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from e
        with handle:
            yield _SafetensorsSource(handle), dict(handle.metadata() or {}), []
        return
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - the common reader below loads it (legacy format) or explains why not
        obj = None
    if obj is None:
        yield load_state_dict(path), {}, []
        return
    extras: list[str] = []
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        extras = [str(k) for k in obj if k != "state_dict"]
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} holds no state dict (a mapping of names to tensors)")
    yield obj, {}, extras


def convert_checkpoint(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    target: str = NATIVE,
    overwrite: bool = False,
    verify: bool = False,
    progress: bool = True,
) -> ConversionReport:
    """Convert the checkpoint file ``src`` to the ``target`` layout and write it to ``dst``.

    Formats follow the extensions (``.safetensors`` or a ``torch.save`` pickle) on each side.
    ``dst`` is written atomically and only after the whole conversion succeeded; an existing
    ``dst`` is refused unless ``overwrite``. A pickle's entries other than ``state_dict``
    (e.g. ``global_step``) are not written; the report names them.
    """
    dst = Path(dst)
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} exists; refusing to overwrite it (pass --force to replace it)")
    with open_checkpoint(src) as (state, metadata, extras):
        try:
            converted, report = convert_state_dict(state, target, verify=verify, progress=progress)
        except ConversionError as e:
            raise type(e)(f"{src}: {e}") from None
        report.dropped_entries = extras
        keep = metadata if dst.suffix == ".safetensors" else None
        save_state_dict(converted, dst, overwrite=overwrite, metadata=keep)
    return report
