"""A procedural captioned dataset: one shape on a plain background, 64x64 RGB, captioned
"a {colour} {shape} on a {background} background".

A fixed 10 % of the (colour, shape, background) triples is held out of training for evaluating
composition; every pair inside a held-out triple still occurs in training.
"""
from __future__ import annotations

import itertools
import random

import numpy as np
from PIL import Image, ImageDraw

PALETTE = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (240, 210, 40),
    "purple": (150, 60, 190), "orange": (245, 140, 30), "white": (245, 245, 245), "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle")
SIZE = 64
SUPERSAMPLE = 4  # drawn 4x larger, then downsampled: smooth edges


def caption(colour: str, shape: str, background: str) -> str:
    return f"a {colour} {shape} on a {background} background"


def all_triples() -> list[tuple[str, str, str]]:
    return [(c, s, b) for c, s, b in itertools.product(PALETTE, SHAPES, PALETTE) if c != b]


def _held_out(seed: int = 2024, fraction: float = 0.10) -> list[tuple[str, str, str]]:
    """Pick triples to hold out such that each of their (colour, shape), (colour, background) and
    (shape, background) pairs still appears in some training triple."""
    triples = all_triples()
    rng = random.Random(seed)
    order = triples[:]
    rng.shuffle(order)
    target = round(fraction * len(triples))
    held: set = set()
    for t in order:
        if len(held) == target:
            break
        rest = [u for u in triples if u not in held and u != t]
        c, s, b = t
        if (any(u[0] == c and u[1] == s for u in rest) and any(u[0] == c and u[2] == b for u in rest)
                and any(u[1] == s and u[2] == b for u in rest)):
            held.add(t)
    return sorted(held)


HELD_OUT = _held_out()
TRAIN_TRIPLES = [t for t in all_triples() if t not in set(HELD_OUT)]


def render(colour: str, shape: str, background: str, rng: random.Random) -> Image.Image:
    """One image: the shape is 30-60 % of the side, entirely inside the frame."""
    big = SIZE * SUPERSAMPLE
    img = Image.new("RGB", (big, big), PALETTE[background])
    draw = ImageDraw.Draw(img)
    side = rng.uniform(0.30, 0.60) * big
    x0 = rng.uniform(1, big - side - 1)
    y0 = rng.uniform(1, big - side - 1)
    fill = PALETTE[colour]
    if shape == "circle":
        draw.ellipse([x0, y0, x0 + side, y0 + side], fill=fill)
    elif shape == "square":
        draw.rectangle([x0, y0, x0 + side, y0 + side], fill=fill)
    else:  # upright triangle, equilateral-ish: height = side
        draw.polygon([(x0 + side / 2, y0), (x0, y0 + side), (x0 + side, y0 + side)], fill=fill)
    return img.resize((SIZE, SIZE), Image.Resampling.BOX)


def sample_batch(n: int, rng: random.Random, triples=None) -> tuple[np.ndarray, list[str], list[tuple]]:
    """(n, 64, 64, 3) uint8 images, their captions and triples, drawn from `triples` (training ones by default)."""
    triples = triples or TRAIN_TRIPLES
    picks = [rng.choice(triples) for _ in range(n)]
    images = np.stack([np.asarray(render(*t, rng)) for t in picks])
    return images, [caption(*t) for t in picks], picks
