"""A deterministic checker of generated shape images: which colour, shape and background it shows.

background = the palette colour nearest the image border's dominant colour; object = pixels far from
the background colour; colour = the palette entry nearest the object's median colour; shape = from the
object's fill ratio of its bounding box (square ~1, circle ~pi/4, triangle ~1/2) and its top-bottom
width asymmetry (a triangle is narrow at the top).
"""
from __future__ import annotations

import numpy as np

from .data import PALETTE

_NAMES = list(PALETTE)
_COLOURS = np.array([PALETTE[n] for n in _NAMES], dtype=np.float32)


def nearest_colour(rgb) -> str:
    return _NAMES[int(np.argmin(((_COLOURS - np.asarray(rgb, dtype=np.float32)) ** 2).sum(1)))]


def classify(image) -> dict:
    """(64, 64, 3) uint8 array or PIL image -> {"colour", "shape", "background"} (None where unsure)."""
    a = np.asarray(image, dtype=np.float32)[..., :3]
    border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
    labels = [nearest_colour(p) for p in border]
    background = max(set(labels), key=labels.count)
    bg = np.asarray(PALETTE[background], dtype=np.float32)
    dist = np.sqrt(((a - bg) ** 2).sum(-1))
    mask = dist > 60.0
    if mask.sum() < 20:  # nothing drawn
        return {"colour": None, "shape": None, "background": background}
    colour = nearest_colour(np.median(a[mask], axis=0))
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max(), xs.min(), xs.max()
    box = mask[y0:y1 + 1, x0:x1 + 1]
    fill = box.mean()
    h = box.shape[0]
    top = box[: max(1, h // 4)].mean()
    bottom = box[h - max(1, h // 4):].mean()
    if fill > 0.88:
        shape = "square"
    elif bottom > 1.8 * top and fill < 0.7:
        shape = "triangle"
    else:
        shape = "circle"
    return {"colour": colour, "shape": shape, "background": background}


def accuracy(images, triples) -> dict:
    """Per-attribute accuracy of the checker's verdicts against the intended (colour, shape, bg) triples."""
    hits = {"colour": 0, "shape": 0, "background": 0}
    for img, (c, s, b) in zip(images, triples):
        v = classify(img)
        hits["colour"] += v["colour"] == c
        hits["shape"] += v["shape"] == s
        hits["background"] += v["background"] == b
    n = max(1, len(triples))
    return {k: v / n for k, v in hits.items()}
