"""Textual-inversion embeddings: the files people bring from AUTOMATIC1111, kohya-ss and diffusers,
read into named vectors that take the place of a word's token embeddings in a prompt.

Formats: A1111's ``.pt``/``.bin`` (a dict whose ``string_to_param`` maps ``"*"`` to the vectors),
kohya-ss' safetensors (``emb_params``), diffusers' ``learned_embeds`` (one entry, the token to its
vectors) and a bare tensor. Vectors are (n, width) for an n-vector embedding, or (width,) for one.
Pickles are read with ``weights_only=True``. The name of an embedding is its file's stem, as in A1111.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from ldm.checkpoint import CheckpointError, load_state_dict, read_torch_file

logger = logging.getLogger(__name__)

SUFFIXES = (".pt", ".bin", ".safetensors")
MAX_VECTORS = 75  # an embedding must fit in one chunk of the prompt
TEXT_ENCODERS = {768: "SD1.x (CLIP ViT-L/14, 768-wide)", 1024: "SD2.x (OpenCLIP ViT-H/14, 1024-wide)"}
"""Text encoders by the width of their token embeddings, to name what an embedding was trained for."""


class EmbeddingError(ValueError):
    """A file that is not a textual-inversion embedding for this model's text encoder."""


@dataclass(frozen=True, eq=False)
class Embedding:
    """A textual-inversion embedding: its prompt word, its vectors (n, width), float32, and its file.
    Equal only to itself (its vectors are a tensor)."""

    name: str
    vectors: torch.Tensor
    path: Path

    def __repr__(self) -> str:
        return f"Embedding({self.name!r}, {len(self.vectors)} vector{'s' * (len(self.vectors) != 1)}, {self.path})"


def read_vectors(path: str | os.PathLike) -> torch.Tensor:
    """The vectors (n, width) of an embedding file in any of the formats above, float32."""
    path = Path(path)
    if path.suffix.lower() not in SUFFIXES:
        raise EmbeddingError(f"{path}: not an embedding file (expected {', '.join(SUFFIXES)}; embeddings inside images are not supported)")
    try:
        data = load_state_dict(path) if path.suffix.lower() == ".safetensors" else read_torch_file(path)
    except CheckpointError as e:
        raise EmbeddingError(str(e)) from None
    vectors = _vectors(data, path)
    if not vectors.is_floating_point():
        raise EmbeddingError(f"{path}: the embedding's vectors are {vectors.dtype}, not floating point")
    vectors = vectors.detach().to(torch.float32)
    if vectors.ndim == 1:
        vectors = vectors[None]
    if vectors.ndim != 2 or not 1 <= len(vectors) <= MAX_VECTORS:
        raise EmbeddingError(f"{path}: vectors of shape {tuple(vectors.shape)}; an embedding is (n, width) with n from 1 to {MAX_VECTORS}")
    if not torch.isfinite(vectors).all():
        raise EmbeddingError(f"{path}: the embedding holds NaN or infinite values")
    return vectors


def _vectors(data: object, path: Path) -> torch.Tensor:
    if isinstance(data, torch.Tensor):
        return data
    if not isinstance(data, Mapping):
        raise EmbeddingError(f"{path}: holds a {type(data).__name__}, not an embedding")
    if "clip_l" in data or "clip_g" in data:
        raise EmbeddingError(f"{path}: an SDXL embedding (clip_l/clip_g vectors); this model takes SD2.x embeddings")
    if "string_to_param" in data:  # A1111
        params = data["string_to_param"]
        if not isinstance(params, Mapping) or len(params) != 1:
            raise EmbeddingError(f"{path}: string_to_param should map one placeholder to the vectors, it holds {_describe(params)}")
        data = params
    elif "emb_params" in data:  # kohya-ss
        data = {"emb_params": data["emb_params"]}
    tensors = [v for v in data.values() if isinstance(v, torch.Tensor)]
    if len(data) != 1 or len(tensors) != 1:  # diffusers: {token: vectors}
        raise EmbeddingError(f"{path}: not a textual-inversion embedding (expected string_to_param, emb_params, one token's "
                             f"vectors or a tensor; found {_describe(data)})")
    return tensors[0]


def _describe(value: object) -> str:
    if isinstance(value, Mapping):
        keys = sorted(map(str, value))
        return f"keys {', '.join(keys[:6])}" + (f", ... ({len(keys) - 6} more)" if len(keys) > 6 else "") if keys else "no entries"
    return type(value).__name__


def check_width(vectors: torch.Tensor, width: int, path: Path) -> None:
    """Vectors as wide as the text encoder's token embeddings, else an error naming the model they fit."""
    found = vectors.shape[-1]
    if found != width:
        made_for = TEXT_ENCODERS.get(found, f"another text encoder ({found}-wide)")
        this = TEXT_ENCODERS.get(width, f"{width}-wide")
        raise EmbeddingError(f"{path}: an embedding for {made_for}; this model's text encoder is {this}")


def load_embedding(path: str | os.PathLike, width: int) -> Embedding:
    """The embedding in ``path``, named after the file's stem, checked to be ``width`` wide."""
    path = Path(path)
    if not path.is_file():
        raise EmbeddingError(f"{path}: no such file")
    vectors = read_vectors(path)
    check_width(vectors, width, path)
    if not path.stem.strip():
        raise EmbeddingError(f"{path}: the file's name is its prompt word, and it has none")
    return Embedding(path.stem, vectors, path)


def load_embeddings(files: Iterable[str | os.PathLike], folder: str | os.PathLike | None, width: int) -> list[Embedding]:
    """The embeddings of ``files`` (each must load) and of the embedding files under ``folder``
    (recursively; a file that does not fit this model is skipped with a warning, as A1111 skips
    them). Two embeddings of one name are an error."""
    loaded = [load_embedding(f, width) for f in files]
    if folder is not None:
        folder = Path(folder)
        if not folder.is_dir():
            raise EmbeddingError(f"{folder}: not a folder")
        for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES):
            try:
                loaded.append(load_embedding(path, width))
            except EmbeddingError as e:
                logger.warning("skipped %s", e)
    names: dict[str, Embedding] = {}
    for embedding in loaded:
        other = names.setdefault(embedding.name, embedding)
        if other is not embedding:
            raise EmbeddingError(f"two embeddings are named {embedding.name!r}: {other.path} and {embedding.path}")
    for embedding in loaded:
        logger.info("textual-inversion embedding %r: %d vector(s) from %s", embedding.name, len(embedding.vectors), embedding.path)
    return loaded
