"""The artifact cache: exported ONNX graphs (and TensorRT engines) built once and reused.

Layout: <root>/<kind>/<key>/ holding the artifact's files and a `meta.json` written last, where
<key> = <component>-<weights hash>-<shape profile>-<precision>-<runtime tag>. The weights hash covers
the component's own tensors and config, so a UNet graph survives a VAE swap; the runtime tag
carries the exporter's (or TensorRT's) version, so an upgrade misses the old key and rebuilds.

Writes are atomic: an artifact is built in a private temporary folder under the same root and
renamed into place; two processes racing on one key each build, and the first rename wins. A folder
whose files do not match the sizes and digest recorded in its meta.json (truncated, half-deleted,
edited) is set aside with a warning and rebuilt.

The root is $LDM_ENGINE_CACHE, else $XDG_CACHE_HOME/ldm_engine, else ~/.cache/ldm_engine.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import tempfile
import uuid
import warnings
import weakref
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Callable

import torch

ENV_VAR = "LDM_ENGINE_CACHE"
META = "meta.json"


def cache_root() -> Path:
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ldm_engine"


_HASHES: "weakref.WeakKeyDictionary[torch.nn.Module, tuple[tuple, str, str]]" = weakref.WeakKeyDictionary()
_SERIALS: dict[int, tuple[weakref.ref, int]] = {}  # id(tensor) -> (its weak reference, serial)
_next_serial = itertools.count()


def _serial(t: torch.Tensor) -> int:
    """A number never reused for another tensor object (ids and addresses are, once freed). Keyed by
    id: tensors compare elementwise, so they cannot be dictionary keys themselves."""
    entry = _SERIALS.get(id(t))
    if entry is not None and entry[0]() is t:
        return entry[1]
    key, n = id(t), next(_next_serial)
    _SERIALS[key] = (weakref.ref(t, lambda _: _forget_serial(key, n)), n)
    return n


def _forget_serial(key: int, n: int) -> None:
    """The tensor with serial n died: drop its entry (unless its id was already taken over)."""
    if _SERIALS.get(key, (None, None))[1] == n:
        del _SERIALS[key]


def _version_stamp(module: torch.nn.Module) -> tuple:
    """Changes whenever a tensor is modified in place (torch bumps its version counter) or replaced by
    another one (a new Parameter object, e.g. an enlarged embedding table, or new storage)."""
    tensors = [*module.parameters(), *module.buffers()]
    return tuple((_serial(t), t.data_ptr(), tuple(t.shape), t._version) for t in tensors)


def weights_hash(module: torch.nn.Module, config=None) -> str:
    """blake2b over the module's tensor names, dtypes, shapes and bytes (and its config): 16 hex
    digits. Remembered per module until its weights change."""
    stamp = _version_stamp(module)
    config_text = "" if config is None else json.dumps(asdict(config) if is_dataclass(config) else config,
                                                        sort_keys=True, default=str)
    known = _HASHES.get(module)
    if known and known[:2] == (stamp, config_text):
        return known[2]
    h = hashlib.blake2b(digest_size=8)
    h.update(config_text.encode())
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    digest = h.hexdigest()
    _HASHES[module] = (stamp, config_text, digest)
    return digest


def artifact_key(component: str, weights: str, profile: str, precision: str, runtime: str) -> str:
    """One folder name from the five parts of a key; each part is kept filesystem-safe."""
    parts = [component, weights, profile, precision, runtime]
    for p in parts:
        if not p or any(c in p for c in "/\\\0") or p.startswith("."):
            raise ValueError(f"invalid artifact key part {p!r}")
    return "-".join(parts)


def file_digest(*paths: Path) -> str:
    """blake2b over the bytes of the given files, in order (missing ones skipped)."""
    h = hashlib.blake2b(digest_size=16)
    for path in paths:
        if Path(path).is_file():
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 22), b""):
                    h.update(block)
    return h.hexdigest()


def write_meta(folder: Path, info: dict, digest_limit: int = 256 * 1024**2) -> None:
    """Record every file's size (and a digest of those under `digest_limit` bytes: the graph protobufs,
    not multi-GB weight files, whose truncation the size already catches), then the caller's info."""
    files = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.name != META:
            size = p.stat().st_size
            files[p.name] = {"size": size, "digest": file_digest(p) if size <= digest_limit else None}
    (folder / META).write_text(json.dumps({"files": files, **info}, indent=1, sort_keys=True))


def verify(folder: Path) -> str | None:
    """None when the folder holds exactly what its meta.json recorded; else what is wrong."""
    meta_path = folder / META
    try:
        meta = json.loads(meta_path.read_text())
        files = meta["files"]
    except FileNotFoundError:
        return "meta.json is missing (an interrupted build)"
    except (ValueError, KeyError, TypeError):
        return "meta.json is unreadable"
    for name, rec in files.items():
        p = folder / name
        if not p.is_file():
            return f"{name} is missing"
        if p.stat().st_size != rec.get("size"):
            return f"{name} has {p.stat().st_size} bytes, {rec.get('size')} were written"
        if rec.get("digest") and file_digest(p) != rec["digest"]:
            return f"{name} does not match its recorded digest"
    return None


def read_meta(folder: Path) -> dict:
    return json.loads((Path(folder) / META).read_text())


class ArtifactCache:
    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root) if root is not None else cache_root()

    def folder(self, kind: str, key: str) -> Path:
        return self.root / kind / key

    def get_or_build(self, kind: str, key: str, build: Callable[[Path], dict | None]) -> Path:
        """The folder of a valid artifact for `key`, building it with `build(tmp_folder)` when it is
        missing or corrupt. `build` writes its files into the folder it is given and may return extra
        info for meta.json."""
        final = self.folder(kind, key)
        if final.is_dir():
            problem = verify(final)
            if problem is None:
                return final
            warnings.warn(f"cached artifact {final} is damaged ({problem}); rebuilding it", stacklevel=3)
            self._set_aside(final)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", suffix=".tmp", dir=final.parent))
        try:
            info = build(tmp) or {}
            write_meta(tmp, {"key": key, **info})
            try:
                os.rename(tmp, final)  # atomic; fails when another process got there first
            except OSError:
                if final.is_dir() and verify(final) is None:
                    return final  # the other build won; ours is discarded below
                self._set_aside(final)
                os.rename(tmp, final)
            return final
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def _set_aside(self, folder: Path) -> None:
        """Move a damaged folder out of the way (rename first: atomic for readers), then delete it."""
        trash = folder.with_name(f".{folder.name}.{uuid.uuid4().hex[:8]}.stale")
        try:
            os.rename(folder, trash)
        except OSError:
            return  # already moved by another process
        shutil.rmtree(trash, ignore_errors=True)

    def entries(self) -> list[dict]:
        """Every finished artifact: kind, key, size in bytes and whether it verifies."""
        rows = []
        if not self.root.is_dir():
            return rows
        for kind in sorted(d for d in self.root.iterdir() if d.is_dir()):
            for folder in sorted(d for d in kind.iterdir() if d.is_dir() and not d.name.startswith(".")):
                size = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
                rows.append({"kind": kind.name, "key": folder.name, "bytes": size, "ok": verify(folder) is None})
        return rows

    def clear(self) -> int:
        """Delete every artifact (and leftovers of interrupted builds); returns the bytes freed."""
        freed = 0
        if not self.root.is_dir():
            return freed
        for kind in [d for d in self.root.iterdir() if d.is_dir()]:
            for folder in [d for d in kind.iterdir() if d.is_dir()]:
                freed += sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
                self._set_aside(folder)
        return freed

