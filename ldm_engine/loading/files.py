"""Reading tensors from disk safely: safetensors, or `torch.load(weights_only=True)` for pickles.

Every failure becomes a CheckpointError naming the file: truncated files, headers that lie, text
files with a checkpoint suffix, and pickles that would run code (which are never executed)."""
from __future__ import annotations

import json
import pickle
import struct
import zipfile
from pathlib import Path

import torch

from .errors import CheckpointError

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
_MAX_HEADER = 100 * 1024 * 1024  # safetensors caps its JSON header at 100 MB


def read_json(path: Path) -> dict:
    """A JSON config file, or a CheckpointError naming it when it is not valid JSON."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def _check_safetensors_header(path: Path) -> None:
    """Validate the header against the file size before the library maps the file."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER or 8 + n > size:
            raise CheckpointError(f"{path}: truncated or corrupt safetensors file (header of {n} bytes, "
                                  f"file of {size} bytes)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    data = size - 8 - n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(o, int) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1]):
            raise CheckpointError(f"{path}: corrupt safetensors header (bad entry for tensor {name!r})")
        if offsets[1] > data:
            raise CheckpointError(f"{path}: truncated safetensors file (tensor {name!r} ends at byte "
                                  f"{offsets[1]} of a {data}-byte data section)")


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    _check_safetensors_header(path)
    try:
        return load_file(str(path))
    except (SafetensorError, ValueError, TypeError, OverflowError, RuntimeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors file ({e})") from None


def read_pickle(path: Path) -> dict[str, torch.Tensor]:
    """torch.load with weights_only=True: tensors and plain containers only, never code."""
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        msg = str(e)
        if "Weights only load failed" not in msg:
            raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({msg.strip()[:200]})") from None
        culprit = next((line.strip() for line in msg.splitlines() if "Unsupported global" in line), "")
        raise CheckpointError(
            f"{path}: refused to load: the pickle asks to run code or build objects other than tensors"
            f"{' (' + culprit + ')' if culprit else ''}. Only weights are read (torch.load with "
            f"weights_only=True); convert the file to .safetensors with a tool you trust.") from None
    except (RuntimeError, EOFError, ValueError, OSError, zipfile.BadZipFile, KeyError, IndexError, TypeError,
            AttributeError, struct.error, UnicodeDecodeError, MemoryError) as e:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: "
                              f"{str(e)[:200]})") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: not a checkpoint (holds a {type(obj).__name__}, not a dict of tensors)")
    return obj


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of one weights file, by key. Non-tensor entries (step counters) are dropped."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        sd = read_safetensors(path)
    elif path.suffix in PICKLE_SUFFIXES:
        sd = read_pickle(path)
    else:
        raise CheckpointError(f"{path}: unknown weights format {path.suffix!r}; expected .safetensors "
                              f"or one of {', '.join(PICKLE_SUFFIXES)}")
    tensors = {k: v for k, v in sd.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path}: holds no tensors; is it a model checkpoint?")
    return tensors


def read_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata of a safetensors file ({} for other formats or none)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        return {}
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})
