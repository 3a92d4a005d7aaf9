"""Layout-to-image (the LDM paper's OpenImages layout2img model, Rombach et al. 2022, Sec. 4.3.1): bounding
boxes become a token sequence, which the model's BERT-style transformer (ldm_engine.models.bert) turns into
the UNet's cross-attention context.

The tokens are those of taming-transformers' `ObjectsBoundingBoxConditionalBuilder`
(taming/data/conditional_builder/objects_bbox.py and objects_center_points.py; Jahn, Rombach and Ommer,
"High-Resolution Complex Scene Synthesis with Transformers", 2021), with V the transformer's vocabulary
(8192) and n its objects (30; sequence length L = 3n + 2 = 92):

    grid     S = floor(sqrt(V)) sections per side (90); a point (x, y) in [0, 1]^2 is the token
             round(y (S - 1)) S + round(x (S - 1))    (Python's round: halves to even), 0 ... S^2 - 1 (8099)
    object   (class, token(x0, y0), token(x0 + w, y0 + h)),  w = min(x1 - x0, 1 - x0), h = min(y1 - y0, 1 - y0)
             (the builder's box (x, y, w, h) after its rescale to the full-image crop)
    padding  (V - 1, V - 1, V - 1) for every absent object, up to n            (V - 1 = 8191)
    crop     token(0, 0), token(1, 1) = 0, S^2 - 1: the whole image (the builder's encode_crop)
    sequence the objects in the order given, the padding, then the two crop tokens

Training shuffled each image's objects, so the model knows no order; here they keep the order given. The
class token is the class number as the training data numbered its classes (the builder adds multiples of
the class count for group-of / occluded / depiction / inside flags; none are set here). The checkpoint does
not store class names, and the names of the OpenImages numbering (taming's AnnotatedObjectsOpenImages:
its allowed classes sorted by OpenImages label id) come from the OpenImages class-description file, which is
not shipped here: pass class numbers, or `class_names=` (a list, or a text file with one name per line, line
i naming class i) to use names (matched without regard to case).
"""
from __future__ import annotations

import difflib
import json
import math
from dataclasses import dataclass
from numbers import Real
from pathlib import Path

import torch

EXAMPLE = '[("Person", (0.1, 0.2, 0.5, 0.9)), (3, (0.5, 0.5, 0.9, 0.9))]'


@dataclass(frozen=True)
class LayoutScheme:
    """The token layout of one model: vocabulary V and maximum object count n."""

    vocab_size: int
    max_objects: int

    @classmethod
    def of(cls, text_config) -> "LayoutScheme":
        length, vocab = text_config.max_length, text_config.vocab_size
        if length < 2 or (length - 2) % 3:
            raise ValueError(f"a layout sequence is 3 tokens per object plus 2 crop tokens; {length} is not")
        if math.isqrt(vocab) ** 2 > vocab - 1:  # the grid's last point would be the padding token
            raise ValueError(f"a layout vocabulary of {vocab} leaves no padding token beside its coordinate grid")
        return cls(vocab, (length - 2) // 3)

    @property
    def sections(self) -> int:
        return math.isqrt(self.vocab_size)

    @property
    def pad(self) -> int:
        return self.vocab_size - 1

    @property
    def length(self) -> int:
        return 3 * self.max_objects + 2

    def point(self, x: float, y: float) -> int:
        s = self.sections
        return int(round(y * (s - 1))) * s + int(round(x * (s - 1)))

    def tokens(self, objects: list[tuple[int, tuple[float, float, float, float]]]) -> list[int]:
        """[(class number, (x0, y0, x1, y1)), ...] (checked) -> the L tokens."""
        out = []
        for label, (x0, y0, x1, y1) in objects:
            w, h = min(x1 - x0, 1.0 - x0), min(y1 - y0, 1.0 - y0)
            out += [label, self.point(x0, y0), self.point(x0 + w, y0 + h)]
        out += [self.pad] * 3 * (self.max_objects - len(objects))
        return out + [self.point(0.0, 0.0), self.point(1.0, 1.0)]


def load_class_names(names) -> list[str] | None:
    """`names`: None, a list of class names (index = class number), or a text file with one name per line."""
    if names is None:
        return None
    if isinstance(names, (str, Path)):
        path = Path(names)
        if not path.is_file():
            raise FileNotFoundError(f"class names file {path} does not exist (one class name per line)")
        names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        while names and not names[-1]:
            names.pop()
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) and n for n in names):
        raise ValueError("class_names must be a list of non-empty strings (index = class number) or a text file "
                         "with one name per line")
    return list(names)


def _is_object(item) -> bool:
    return (isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[0], (str, int))
            and isinstance(item[1], (list, tuple)))


def split_layouts(layout) -> list[list]:
    """One layout (a list of objects) -> [layout]; a list of layouts (one per image) -> itself."""
    if not isinstance(layout, (list, tuple)):
        raise ValueError(f"layout must be a list of (class, (x0, y0, x1, y1)) objects, e.g. {EXAMPLE}, or a list of "
                         f"such lists (one per image); got {type(layout).__name__}")
    if layout and all(isinstance(x, (list, tuple)) and not _is_object(x) and all(_is_object(o) for o in x)
                      for x in layout):
        return [list(x) for x in layout]
    return [list(layout)]


def _class_number(label, i: int, names: list[str] | None, scheme: LayoutScheme) -> int:
    if isinstance(label, bool) or not isinstance(label, (str, int)):
        raise ValueError(f"object {i}: the class must be a class number or name, got {label!r}")
    if isinstance(label, str):
        if names is None:
            raise ValueError(f"object {i}: class {label!r} is a name, but the checkpoint stores no class names; "
                             "pass class_names= (a list or a file with one name per line, line i = class i) or class "
                             "numbers")
        lowered = {n.lower(): k for k, n in enumerate(names)}
        if label.lower() not in lowered:
            close = difflib.get_close_matches(label, names, n=3)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise ValueError(f"object {i}: unknown class {label!r} (not among the {len(names)} class names){hint}")
        return lowered[label.lower()]
    limit = len(names) if names is not None else scheme.pad  # the padding token is no class
    if not 0 <= label < limit:
        raise ValueError(f"object {i}: class number {label} is out of range; this model takes 0..{limit - 1}")
    return label


def _box(box, i: int) -> tuple[float, float, float, float]:
    if len(box) != 4 or not all(isinstance(v, Real) and not isinstance(v, bool) for v in box):
        raise ValueError(f"object {i}: a box is four numbers (x0, y0, x1, y1) in [0, 1], got {box!r}")
    x0, y0, x1, y1 = (float(v) for v in box)
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
        raise ValueError(f"object {i}: box {box!r} holds NaN or inf")
    if not all(0.0 <= v <= 1.0 for v in (x0, y0, x1, y1)):
        raise ValueError(f"object {i}: box {box!r} reaches outside the image; coordinates are fractions of the "
                         "width and height, in [0, 1]")
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"object {i}: box {box!r} is empty; it needs x1 > x0 and y1 > y0 (x0, y0 the top-left "
                         "corner, x1, y1 the bottom-right)")
    return x0, y0, x1, y1


def layout_ids(layout, text_config, class_names=None) -> torch.Tensor:
    """layout(s) -> (B, L) int64 token ids for the model whose transformer config is `text_config`."""
    scheme = LayoutScheme.of(text_config)
    names = load_class_names(class_names)
    rows = []
    for objects in split_layouts(layout):
        if len(objects) > scheme.max_objects:
            raise ValueError(f"layout has {len(objects)} objects; this model takes at most {scheme.max_objects}")
        checked = []
        for i, obj in enumerate(objects):
            if not _is_object(obj):
                raise ValueError(f"object {i}: expected (class, (x0, y0, x1, y1)), got {obj!r}; e.g. {EXAMPLE}")
            checked.append((_class_number(obj[0], i, names, scheme), _box(obj[1], i)))
        rows.append(scheme.tokens(checked))
    return torch.tensor(rows, dtype=torch.long)


def check_args(cfg, layout, class_names) -> None:
    """Refuse layout input for other models, and a layout model's call without a layout."""
    if cfg.conditioning != "layout":
        if layout is not None or class_names is not None:
            raise ValueError(f"{cfg.name} is not a layout-to-image model: layout and class_names apply only to "
                             "layout models (ldm-layout2img)")
        return
    if layout is None:
        raise ValueError(f"{cfg.name} is a layout-to-image model: pass layout=[(class, (x0, y0, x1, y1)), ...] with "
                         f"coordinates in [0, 1], e.g. {EXAMPLE}")


def layout_context(backend, layout, text_config, class_names=None) -> torch.Tensor:
    """layout(s) -> the UNet's context (B, L, C), through the backend's text-encoder graph."""
    return backend.encode_text(layout_ids(layout, text_config, class_names))


def layout_text(layout) -> str:
    """The layout as compact JSON (for the PNG parameters): [["Person", [0.1, 0.2, 0.5, 0.9]], ...]."""
    return json.dumps(layout, separators=(", ", ": "))
