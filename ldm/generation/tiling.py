"""Decoding latents in overlapping tiles, for images whose full-size decoder activations do not fit
in memory (the x4 upscaler's 2048x2048 outputs).

Each tile is decoded on its own and the tiles are blended with linear ramps across their overlap.
This is an approximation: the decoder's GroupNorm statistics are computed per tile rather than
over the whole image, so tiled and untiled images differ slightly (measured in docs/memory.md);
untiled decoding stays the default wherever it fits.
"""

from __future__ import annotations

from typing import Callable

import torch


def _ramp(length: int, overlap: int, start: bool, end: bool, device: torch.device) -> torch.Tensor:
    """Weights along one side of a tile: rising over the overlap at a shared start, falling at a shared end."""
    w = torch.ones(length, device=device)
    if overlap:
        edge = (torch.arange(overlap, device=device, dtype=torch.float32) + 0.5) / overlap
        if start:
            w[:overlap] = torch.minimum(w[:overlap], edge)
        if end:
            w[-overlap:] = torch.minimum(w[-overlap:], edge.flip(0))
    return w


def _starts(size: int, tile: int, overlap: int) -> list[int]:
    if size <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, size - tile, stride)) + [size - tile]
    return sorted(set(starts))


def decode_tiled(decode: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor, factor: int,
                 tile: int = 64, overlap: int = 16) -> torch.Tensor:
    """``decode(z)`` assembled from tiles of ``tile`` latent pixels overlapping by ``overlap``;
    ``factor``: the decoder's upsampling."""
    if not 0 <= overlap < tile:
        raise ValueError(f"the overlap ({overlap}) must be smaller than the tile ({tile})")
    b, _, h, w = z.shape
    out = weight = None
    ys, xs = _starts(h, tile, overlap), _starts(w, tile, overlap)
    for y in ys:
        for x in xs:
            th, tw = min(tile, h - y), min(tile, w - x)
            part = decode(z[:, :, y : y + th, x : x + tw]).float()
            if out is None:
                out = torch.zeros(b, part.shape[1], h * factor, w * factor, device=part.device)
                weight = torch.zeros(1, 1, h * factor, w * factor, device=part.device)
            o = overlap * factor
            wy = _ramp(th * factor, o, y > 0, y + th < h, part.device)
            wx = _ramp(tw * factor, o, x > 0, x + tw < w, part.device)
            mask = wy[:, None] * wx[None, :]
            region = (slice(None), slice(None), slice(y * factor, (y + th) * factor), slice(x * factor, (x + tw) * factor))
            out[region] += part * mask
            weight[region] += mask
    return out / weight
