"""Prompts files for batch generation: `.txt` (one prompt per non-empty line, `#` lines are comments) or
`.jsonl` (one JSON object per line: `prompt` plus the Pipeline call arguments a JSON value can give —
negative_prompt, num_inference_steps (or `steps`), guidance_scale, sampler, seed, width, height, eta,
clip_skip, strength, image, mask_image (paths relative to the file) ...). Every line is checked before
anything runs; an error names its line.
"""
from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from pathlib import Path


class BatchError(ValueError):
    """A prompts file, a batch option or one of the job's images was wrong (the message names the line)."""


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# what each key of a .jsonl line must hold: (description for the error, check)
_FIELDS = {
    "prompt": ("a string", lambda v: isinstance(v, str)),
    "negative_prompt": ("a string", lambda v: isinstance(v, str)),
    "num_inference_steps": ("an integer >= 1", lambda v: _int(v) and v >= 1),
    "guidance_scale": ("a number >= 0", lambda v: _num(v) and v >= 0),
    "sampler": ("a sampler name", lambda v: isinstance(v, str)),
    "seed": ("an integer >= 0", lambda v: _int(v) and v >= 0),
    "width": ("an integer >= 1", lambda v: _int(v) and v >= 1),
    "height": ("an integer >= 1", lambda v: _int(v) and v >= 1),
    "eta": ("a number >= 0", lambda v: _num(v) and v >= 0),
    "clip_skip": ("an integer >= 1", lambda v: _int(v) and v >= 1),
    "strength": ("a number in [0, 1]", lambda v: _num(v) and 0 <= v <= 1),
    "image": ("a path to an image file", lambda v: isinstance(v, str) and v != ""),
    "mask_image": ("a path to a mask image file", lambda v: isinstance(v, str) and v != ""),
    "noise_level": ("an integer >= 0", lambda v: _int(v) and v >= 0),
    "class_label": ("an integer >= 0", lambda v: _int(v) and v >= 0),
    "masked_content": ("a string", lambda v: isinstance(v, str)),
}
ALIASES = {"steps": "num_inference_steps", "negative": "negative_prompt", "guidance": "guidance_scale",
           "mask": "mask_image"}  # the ldm-generate option names
IMAGE_KEYS = ("image", "mask_image")  # paths in the file; their bytes travel with the job (workers may be remote)


def _call_params() -> list[str]:
    from ..pipeline import Pipeline

    return list(inspect.signature(Pipeline.__call__).parameters)


def line_keys() -> list[str]:
    """The keys a .jsonl line may hold: the Pipeline call arguments that a JSON value can give."""
    return [k for k in _call_params() if k in _FIELDS]


@dataclass
class Item:
    index: int  # the prompt's position (comments and blank lines not counted): names the file, offsets the seed
    line: int  # 1-based line in the prompts file, for messages
    args: dict  # Pipeline call arguments (image / mask_image as paths)

    @property
    def name(self) -> str:
        return f"{self.index:05d}.png"


def _line_args(obj, lineno: int, keys: list[str], call_params, base: Path) -> dict:
    if not isinstance(obj, dict):
        raise BatchError(f"line {lineno}: expected a JSON object such as {{\"prompt\": \"a cat\", \"seed\": 1}}, "
                         f"got {type(obj).__name__}")
    from ..sampling import SAMPLERS

    args = {}
    for key, value in obj.items():
        name = ALIASES.get(key, key)
        if name not in keys:
            why = ("is a Pipeline argument a prompts file cannot set (one image per line; no tensors, callbacks or "
                   "ControlNet inputs)" if name in call_params else "is unknown")
            raise BatchError(f"line {lineno}: key {key!r} {why}; use one of {', '.join(keys + list(ALIASES))}")
        if name in args:
            raise BatchError(f"line {lineno}: {key!r} repeats {name!r}; give it once")
        what, ok = _FIELDS[name]
        if not ok(value):
            raise BatchError(f"line {lineno}: {key!r} must be {what}, got {value!r}")
        if name == "sampler" and value not in SAMPLERS:
            raise BatchError(f"line {lineno}: unknown sampler {value!r}; use one of {', '.join(SAMPLERS)}")
        if name in IMAGE_KEYS:
            path = base / value
            if not path.is_file():
                raise BatchError(f"line {lineno}: {key} file {str(path)!r} does not exist (paths are relative to "
                                 "the prompts file's folder)")
            value = str(path)
        args[name] = value
    return args


def read_prompts(path) -> list[Item]:
    """The prompts of a .txt or .jsonl file, all checked before anything runs (BatchError names the line)."""
    path = Path(path)
    if not path.is_file():
        raise BatchError(f"prompts file {str(path)!r} does not exist")
    if path.suffix not in (".txt", ".jsonl"):
        raise BatchError(f"prompts file must end in .txt (one prompt per line) or .jsonl (one JSON object per "
                         f"line), got {path.name!r}")
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()  # -sig: a BOM is not part of the first prompt
    except UnicodeDecodeError as e:
        raise BatchError(f"prompts file {str(path)!r} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    keys, call_params, items = line_keys(), _call_params(), []
    for lineno, text in enumerate(lines, 1):
        text = text.strip()
        if not text or text.startswith("#"):
            continue
        if path.suffix == ".txt":
            args = {"prompt": text}
        else:
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                raise BatchError(f"line {lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
            args = _line_args(obj, lineno, keys, call_params, path.parent)
        items.append(Item(len(items), lineno, args))
    if not items:
        raise BatchError(f"prompts file {str(path)!r} holds no prompts")
    return items


def with_defaults(items: list[Item], defaults: dict, seed: int = 0) -> list[Item]:
    """Each item's arguments over the job's defaults; seed: the line's own, else `seed + index`."""
    return [Item(it.index, it.line, {**{k: v for k, v in defaults.items() if v is not None}, **it.args,
                                    "seed": it.args.get("seed", seed + it.index)}) for it in items]
