"""Tiled autoencoder decode / encode with overlap blending: large images in bounded memory.

The latent is cut into overlapping tiles; each tile is decoded alone and the outputs are blended with
weights that ramp linearly across the overlaps (a partition of unity), so seams fade out. Peak memory
then depends on the tile size, not the image size.
"""
from __future__ import annotations

import torch


def _starts(size: int, tile: int, overlap: int) -> list[int]:
    if size <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, size - tile, stride))
    return starts + [size - tile]


def _ramp(n: int, overlap: int, lead: bool, trail: bool) -> torch.Tensor:
    """1-D weights: linear ramps over `overlap` samples at the ends that meet another tile."""
    w = torch.ones(n)
    if overlap > 0:
        ramp = (torch.arange(overlap, dtype=torch.float32) + 0.5) / overlap
        if lead:
            w[:overlap] = ramp
        if trail:
            w[n - overlap:] = ramp.flip(0)
    return w


def tiled(fn, x: torch.Tensor, tile: int, overlap: int, scale: float, out_channels: int) -> torch.Tensor:
    """Apply a spatial map `fn` (B, C, h, w) -> (B, C', h*scale, w*scale) tile by tile."""
    if overlap >= tile:
        raise ValueError(f"tile overlap ({overlap}) must be smaller than the tile ({tile})")
    b, _, h, w = x.shape
    H, W = int(h * scale), int(w * scale)
    out = torch.zeros(b, out_channels, H, W)
    weight = torch.zeros(1, 1, H, W)
    ys, xs = _starts(h, tile, overlap), _starts(w, tile, overlap)
    for y in ys:
        for x0 in xs:
            th, tw = min(tile, h), min(tile, w)
            piece = fn(x[:, :, y:y + th, x0:x0 + tw]).float().cpu()
            oh, ow = piece.shape[-2:]
            o = int(overlap * scale)
            wy = _ramp(oh, o, y > 0, y + th < h)
            wx = _ramp(ow, o, x0 > 0, x0 + tw < w)
            wt = (wy[:, None] * wx[None, :])[None, None]
            Y, X = int(y * scale), int(x0 * scale)
            out[:, :, Y:Y + oh, X:X + ow] += piece * wt
            weight[:, :, Y:Y + oh, X:X + ow] += wt
    return out / weight


def decode_tiled(decode, z: torch.Tensor, factor: int, tile: int = 64, overlap: int = 16) -> torch.Tensor:
    """decode (B, z, h, w) -> (B, 3, h*factor, w*factor) in latent tiles of `tile` with `overlap`."""
    return tiled(decode, z, tile, overlap, factor, 3)


def encode_tiled(encode_mean, image: torch.Tensor, factor: int, channels: int, tile: int = 512,
                 overlap: int = 128) -> torch.Tensor:
    """encode_mean (B, 3, H, W) -> latent mean (B, z, H/f, W/f), in image tiles."""
    if tile % factor or overlap % factor:
        raise ValueError(f"encoder tiles and overlaps must be multiples of the autoencoder factor {factor}")
    return tiled(encode_mean, image, tile, overlap, 1 / factor, channels)
