"""A1111's prompt syntax for LoRAs, the folders they come from, and the hash A1111 and civitai show.

    <lora:NAME>               text encoder and UNet at 1.0
    <lora:NAME:0.8>           both at 0.8
    <lora:NAME:TE:UNET>       text encoder at TE, UNet at UNET (A1111's positional order)
    <lora:NAME:te=0.5:unet=1> the same by name

As in A1111 (modules/extra_networks.py): every `<kind:...>` tag is removed from the prompt text; `lora`
(and its old alias `lyco`) tags name files NAME.safetensors / .pt / .ckpt under the LoRA folders
(searched recursively); in a batch the tags of the first prompt apply to every image; negative prompts
are not searched for tags.
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import LoraError

log = logging.getLogger(__name__)

_TAG = re.compile(r"<(\w+):([^>]+)>")  # A1111's extra-network tag
LORA_KINDS = ("lora", "lyco")
UNSUPPORTED_KINDS = {"hypernet": "hypernetworks"}
LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt")


@dataclass(frozen=True)
class LoraTag:
    name: str
    text_encoder_scale: float
    unet_scale: float
    text: str  # as written in the prompt


def _number(value: str, tag: str) -> float:
    try:
        x = float(value)
    except ValueError:
        raise LoraError(f"prompt tag {tag}: {value!r} is not a number; write e.g. <lora:NAME:0.8>") from None
    if not math.isfinite(x):
        raise LoraError(f"prompt tag {tag}: the multiplier must be finite, got {value!r}")
    return x


def _parse(args: str, tag: str) -> LoraTag:
    positional, named = [], {}
    for item in args.split(":"):
        parts = item.split("=", 2)  # A1111: exactly one '=' makes a named argument
        if len(parts) == 2:
            named[parts[0].strip()] = parts[1]
        else:
            positional.append(item)
    if not positional or not positional[0].strip():
        raise LoraError(f"prompt tag {tag} names no LoRA; write <lora:NAME:0.8>")
    unknown = set(named) - {"te", "unet"}
    if unknown or len(positional) > 3:
        raise LoraError(f"prompt tag {tag}: only <lora:NAME:TE:UNET> with te= / unet= are supported "
                        f"(got {', '.join(sorted(unknown)) or 'a fourth value (DyLoRA dim)'})")
    te = _number(positional[1], tag) if len(positional) > 1 else 1.0
    te = _number(named["te"], tag) if "te" in named else te
    unet = _number(positional[2], tag) if len(positional) > 2 else te
    unet = _number(named["unet"], tag) if "unet" in named else unet
    return LoraTag(positional[0].strip(), te, unet, tag)


def extract_lora_tags(prompt: str) -> tuple[str, list[LoraTag]]:
    """(prompt without its extra-network tags, the LoRA tags in order). Raises LoraError for a
    malformed LoRA tag or a hypernetwork tag (not supported); other unknown kinds are dropped, as A1111 does."""
    tags: list[LoraTag] = []

    def found(m: re.Match) -> str:
        kind = m[1]
        if kind in LORA_KINDS:
            tags.append(_parse(m[2], m[0]))
        elif kind in UNSUPPORTED_KINDS:
            raise LoraError(f"prompt tag {m[0]}: {UNSUPPORTED_KINDS[kind]} are not supported; remove the tag")
        else:
            log.warning("prompt tag %s: unknown extra network %r, removed from the prompt", m[0], kind)
        return ""

    return _TAG.sub(found, prompt), tags


def available_loras(dirs) -> dict[str, list[Path]]:
    """{stem: files} of every LoRA file under the folders (recursively), .safetensors first."""
    found: dict[str, list[Path]] = {}
    for d in dirs:
        d = Path(d)
        if not d.is_dir():
            raise LoraError(f"LoRA folder {d} does not exist")
        for root, _, files in os.walk(d):
            for f in sorted(files):
                p = Path(root) / f
                if p.suffix.lower() in LORA_SUFFIXES:
                    found.setdefault(p.stem, []).append(p)
    for files in found.values():
        files.sort(key=lambda p: (LORA_SUFFIXES.index(p.suffix.lower()), str(p)))
    return found


def find_lora(name: str, dirs) -> Path:
    """The file a prompt tag names; LoraError listing what the folders hold when there is none."""
    dirs = list(dirs or [])
    if not dirs:
        raise LoraError(f"the prompt names the LoRA {name!r} but no LoRA folders were given: pass "
                        f"Pipeline(..., lora_dirs=[...]) or ldm-generate --lora-dir DIR")
    found = available_loras(dirs)
    if name not in found:
        names = sorted(found)
        listing = ", ".join(names[:30]) + (f", ... ({len(names)} in all)" if len(names) > 30 else "")
        raise LoraError(f"no LoRA named {name!r} in {', '.join(map(str, dirs))}; "
                        f"{'they hold: ' + listing if names else 'they hold no .safetensors/.pt/.ckpt files'}")
    files = found[name]
    same_kind = [p for p in files if p.suffix.lower() == files[0].suffix.lower()]
    if len(same_kind) > 1:
        raise LoraError(f"several LoRA files are named {name!r}: {', '.join(map(str, same_kind))}; rename one")
    return files[0]


_HASHES: dict[tuple, str] = {}


def file_hash(path: Path, metadata: dict[str, str] | None = None) -> str:
    """The sha256 A1111 keeps for a LoRA: the file's `sshs_model_hash` metadata when present, else for
    .safetensors the kohya 'addnet' hash (sha256 of the bytes after the JSON header: the tensor data, so
    editing metadata keeps it), else the sha256 of the whole file. A1111 and civitai show its first 12 hex."""
    if metadata and metadata.get("sshs_model_hash"):
        return metadata["sshs_model_hash"]
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            if path.suffix == ".safetensors":
                n = int.from_bytes(f.read(8), "little")
                f.seek(8 + n)
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _HASHES[key] = h.hexdigest()
    return _HASHES[key]


def short_hash(full: str) -> str:
    return full[:12]


def hashes_text(loras) -> str:
    """A1111's "Lora hashes" value: `name: hash, name: hash` (':' and ',' removed from names)."""
    clean = str.maketrans("", "", ":,")
    return ", ".join(f"{entry['name'].translate(clean)}: {entry['hash']}" for entry in loras)
