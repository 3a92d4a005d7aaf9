"""Textual-inversion embeddings (Gal et al. 2022, "An Image is Worth One Word"): learned input vectors
for the text encoder, called up in a prompt by a trigger word.

Files read (one embedding each, single- or multi-vector, as wide as the text encoder: 768 for SD1,
1024 for SD2):
    A1111 .pt            {"string_to_param": {"*": (N, D)}, "name": ..., ...}     trigger: file stem
    A1111/kohya .safetensors  {"emb_params": (N, D)}                               trigger: file stem
    diffusers learned_embeds.safetensors / .bin   {"<token>": (D,) or (N, D)}      trigger: the key
`token=` overrides the trigger. Pickled files load with torch.load(weights_only=True) only.

How they enter the model: the vectors are appended as new rows of a copy of the text encoder's
token-embedding table, and each trigger maps to its N new ids. The original table is kept and put back
on unload, so unloading restores the weights bit-exactly (and the graph backends find their original
cached graph again). Triggers are matched in the prompt text before BPE, case-insensitively, as whole
words: a trigger edge that is a letter must not touch another letter ("mystyle" is not found in
"mystyles"), other edges may touch anything ("<cat-toy>," matches). For the letter-and-digit names of
A1111 files this is what A1111's match on the token stream finds; unlike it, it does not depend on how
BPE merges the characters around the trigger (a trigger followed by a comma).
"""
from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

log = logging.getLogger(__name__)

SUFFIXES = (".pt", ".safetensors", ".bin")
MAX_VECTORS = 75  # an embedding must fit in one 75-token chunk
_FAMILIES = {768: "SD1, CLIP ViT-L", 1024: "SD2, OpenCLIP ViT-H", 1280: "SDXL"}


@dataclass
class Embedding:
    name: str  # the trigger
    vectors: torch.Tensor  # (N, width) float32, on the CPU
    path: Path | None = None
    hash: str = ""  # first 12 hex digits of the file's sha256: A1111's "TI hashes" entry
    ids: tuple[int, ...] = field(default=())  # the token ids it occupies while loaded

    @property
    def num_vectors(self) -> int:
        return self.vectors.shape[0]


def _width_text(width: int) -> str:
    family = _FAMILIES.get(width)
    return f"{width} wide ({family})" if family else f"{width} wide"


def _torch_load(path: Path):
    from torch.nn import ParameterDict

    try:
        # early A1111 files hold string_to_param as a ParameterDict: allowed, nothing else beyond tensors
        with torch.serialization.safe_globals([ParameterDict]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError, EOFError, RuntimeError (not a zip / truncated)
        raise ValueError(f"cannot read textual-inversion file {path}: {str(e).splitlines()[0] if str(e) else e!r} "
                         f"(pickled files load with weights_only=True only; convert others to .safetensors)") from None


def read_embedding_file(path: str | Path) -> tuple[str | None, torch.Tensor]:
    """(the trigger the file itself names, or None for "use the stem"; vectors (N, D) float32)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"textual-inversion file {path} does not exist")
    if path.stat().st_size == 0:
        raise ValueError(f"textual-inversion file {path} is empty")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            data = load_file(str(path), device="cpu")
        except Exception as e:
            raise ValueError(f"cannot read textual-inversion file {path}: {e}") from None
    else:
        data = _torch_load(path)
    name, vectors = _find_vectors(data, path)
    if not isinstance(vectors, torch.Tensor):
        raise ValueError(f"{path}: the embedding is a {type(vectors).__name__}, not a tensor")
    if vectors.ndim == 1:
        vectors = vectors[None]
    if vectors.ndim != 2 or vectors.numel() == 0:
        raise ValueError(f"{path}: an embedding is (vectors, width); got shape {tuple(vectors.shape)}")
    vectors = vectors.detach().to(torch.float32).contiguous()
    if not torch.isfinite(vectors).all():
        raise ValueError(f"{path}: the embedding holds NaN or inf values; the file is damaged")
    if vectors.shape[0] > MAX_VECTORS:
        raise ValueError(f"{path}: {vectors.shape[0]} vectors; at most {MAX_VECTORS} fit in a prompt chunk")
    return name, vectors


def _find_vectors(data, path: Path):
    if isinstance(data, torch.Tensor):
        return None, data
    if not isinstance(data, dict) or not data:
        raise ValueError(f"{path}: not a textual-inversion embedding (expected a dict of tensors, got "
                         f"{type(data).__name__ if data else 'nothing'})")
    if "string_to_param" in data:  # A1111
        params = data["string_to_param"]
        params = dict(getattr(params, "_parameters", params))
        if len(params) != 1:
            raise ValueError(f"{path}: holds {len(params)} embeddings ({', '.join(map(str, params))}); "
                             "a textual-inversion file holds one")
        return None, next(iter(params.values()))
    if "emb_params" in data:  # A1111 / kohya safetensors
        return None, data["emb_params"]
    if "clip_l" in data or "clip_g" in data:
        raise ValueError(f"{path}: an SDXL embedding (clip_l/clip_g); this model takes SD1/SD2 embeddings")
    tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
    if len(tensors) == 1:  # diffusers: {"<token>": vectors}
        return next(iter(tensors.items()))
    raise ValueError(f"{path}: not a textual-inversion embedding: expected string_to_param, emb_params or one "
                     f"{{token: tensor}} entry, found keys {', '.join(map(str, list(data)[:6]))}")


def file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:12]


def _edge_ok(text: str, i: int, trigger_char: str) -> bool:
    """Whether position i (just outside a match) leaves the trigger's edge a word edge: a letter must
    not touch another letter (CLIP reads letter runs as one word); digits and punctuation may touch
    anything (so "<token>," matches, as with diffusers' added tokens)."""
    return i < 0 or i >= len(text) or not (trigger_char.isalpha() and text[i].isalpha())


def find_triggers(text: str, triggers: list[str]) -> list[tuple[int, int, str]]:
    """Non-overlapping whole-word occurrences (start, end, trigger) of `triggers` in `text`,
    case-insensitive, the longest trigger first where several start at one place."""
    if not triggers or not text:
        return []
    ordered = sorted(set(triggers), key=len, reverse=True)
    patterns = [(t, re.compile(re.escape(t), re.IGNORECASE)) for t in ordered]
    anywhere = re.compile("|".join(re.escape(t) for t in ordered), re.IGNORECASE)
    found, pos = [], 0
    while (m := anywhere.search(text, pos)) is not None:
        start = m.start()
        for trigger, pattern in patterns:
            hit = pattern.match(text, start)
            if hit and _edge_ok(text, start - 1, trigger[0]) and _edge_ok(text, hit.end(), trigger[-1]):
                found.append((start, hit.end(), trigger))
                pos = hit.end()
                break
        else:
            pos = start + 1
    return found


class TextualInversions:
    """The embeddings loaded into one text encoder, and the folders searched for more.

    `tokenize` is the model tokenizer's `tokenize` (text -> ids); `on_change` is called after the
    token-embedding table was replaced (the graph backends drop their text encoder graph then)."""

    def __init__(self, text_encoder, tokenize: Callable[[str], list[int]], dirs=None,
                 on_change: Callable[[], None] | None = None):
        self.text_encoder = text_encoder
        self.tokenize = tokenize
        self.dirs = [Path(d) for d in (dirs or [])]
        for d in self.dirs:
            if not d.is_dir():
                raise FileNotFoundError(f"embedding folder {d} does not exist")
        self.on_change = on_change
        self.loaded: dict[str, Embedding] = {}  # trigger -> embedding, in table order
        self._original: nn.Parameter | None = None  # the table before any embedding was added
        self._skipped: set[Path] = set()  # folder files whose stem is a vocabulary word (warned once)

    @property
    def table(self) -> nn.Embedding:
        """The token-embedding table: CLIP's `embeddings.token_embedding`, the LDM BERT transformer's `token_emb`
        (the text encoder of the textual-inversion paper's own LDM experiments)."""
        te = self.text_encoder
        return te.token_emb if hasattr(te, "token_emb") else te.embeddings.token_embedding

    @property
    def width(self) -> int:
        return self.table.weight.shape[1]

    # ---- loading ---------------------------------------------------------------------------------

    def load(self, path, token: str | None = None) -> str:
        """Load one embedding file; returns its trigger."""
        return self._load_many([(Path(path), token)])[0]

    def _read(self, path: Path, token: str | None) -> Embedding:
        named, vectors = read_embedding_file(path)
        trigger = (token if token is not None else named if named is not None else path.stem).strip()
        if not trigger:
            raise ValueError(f"{path}: empty trigger; pass token='<my-token>'")
        if vectors.shape[1] != self.width:
            raise ValueError(f"{path}: its vectors are {_width_text(vectors.shape[1])}, but this model's text "
                             f"encoder is {_width_text(self.width)}: the embedding was trained for another model family")
        if len(self.tokenize(trigger)) == 1:
            raise ValueError(f"{path}: trigger {trigger!r} is already a word of the tokenizer's vocabulary; "
                             f"pass another trigger with token='<{trigger}>'")
        return Embedding(trigger, vectors, path, file_hash(path))

    def _load_many(self, requests: list[tuple[Path, str | None]]) -> list[str]:
        """Read and check every file first; the table changes only when all of them are good."""
        taken = {k.lower(): e for k, e in self.loaded.items()}
        names, new = [], []
        for path, token in requests:
            e = self._read(path, token)
            clash = taken.get(e.name.lower())
            if clash is not None and clash.path is not None and clash.path.resolve() == path.resolve():
                names.append(clash.name)  # the same file under the same trigger: already there
                continue
            if clash is not None:
                raise ValueError(f"{path}: trigger {e.name!r} is already taken by {clash.path}; pass another "
                                 "token=, or unload_textual_inversions() first")
            taken[e.name.lower()] = e
            names.append(e.name)
            new.append(e)
        if new:
            self._install([*self.loaded.values(), *new])
        return names

    def _install(self, embeddings: list[Embedding]) -> None:
        """Table = original rows + each embedding's vectors, in order; ids assigned accordingly."""
        table = self.table
        before = (table.weight, self._original, self.loaded, {e.name: e.ids for e in embeddings})
        if self._original is None:
            self._original = table.weight
        base = self._original
        if embeddings:
            rows = torch.cat([base.detach(), *(e.vectors.to(base.device, base.dtype) for e in embeddings)])
            table.weight = nn.Parameter(rows, requires_grad=False)
        else:
            table.weight = base  # the very tensor that was there: bit-exact, and its cached graph hits again
            self._original = None
        table.num_embeddings = table.weight.shape[0]
        next_id = base.shape[0]
        self.loaded = {}
        for e in embeddings:
            e.ids = tuple(range(next_id, next_id + e.num_vectors))
            next_id += e.num_vectors
            self.loaded[e.name] = e
        if self.on_change is not None:
            try:
                self.on_change()
            except Exception:  # the backend cannot follow: put everything back as it was
                table.weight, self._original, self.loaded, ids = before
                table.num_embeddings = table.weight.shape[0]
                for e in embeddings:
                    e.ids = ids[e.name]
                raise

    def unload_all(self) -> None:
        if self.loaded:
            self._install([])

    # ---- folders (A1111's embeddings folder: every file by its stem, loaded when mentioned) -------

    def available(self) -> dict[str, Path]:
        """stem -> file for every embedding file under the folders (the first one wins a shared stem)."""
        found: dict[str, Path] = {}
        for d in self.dirs:
            for p in sorted(d.rglob("*")):
                if p.suffix in SUFFIXES and p.is_file() and p.stem.lower() not in found:
                    found[p.stem.lower()] = p
        return {p.stem: p for p in found.values()}

    def load_mentioned(self, texts: list[str]) -> list[str]:
        """Load the folder embeddings whose stem appears in `texts` and that are not loaded yet."""
        if not self.dirs:
            return []
        loaded = {k.lower() for k in self.loaded}
        candidates = {}
        for stem, path in self.available().items():
            if stem.lower() in loaded or path in self._skipped:
                continue
            if len(self.tokenize(stem)) == 1:  # a vocabulary word: taking it over would hijack ordinary prompts
                log.warning("embedding %s is not used: its name %r is a vocabulary word; rename the file", path, stem)
                self._skipped.add(path)
                continue
            candidates[stem] = path
        mentioned = {t.lower() for text in texts for _, _, t in find_triggers(text, list(candidates))}
        todo = [(p, s) for s, p in candidates.items() if s.lower() in mentioned]
        return self._load_many(todo) if todo else []

    # ---- prompts ---------------------------------------------------------------------------------

    def split(self, text: str) -> list[str | tuple[int, ...]]:
        """`text` as pieces: plain text, and each trigger's id group in its place."""
        matches = find_triggers(text, list(self.loaded))
        if not matches:
            return [text]
        by_lower = {k.lower(): e for k, e in self.loaded.items()}
        pieces: list[str | tuple[int, ...]] = []
        pos = 0
        for start, end, trigger in matches:
            if start > pos:
                pieces.append(text[pos:start])
            pieces.append(by_lower[trigger.lower()].ids)
            pos = end
        if pos < len(text):
            pieces.append(text[pos:])
        return pieces

    def used_in(self, texts: list[str]) -> list[Embedding]:
        """The loaded embeddings that `texts` call up, in table order."""
        hit = {t.lower() for text in texts if text for _, _, t in find_triggers(text, list(self.loaded))}
        return [e for k, e in self.loaded.items() if k.lower() in hit]
