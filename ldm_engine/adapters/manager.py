"""`LoraManager`: the LoRAs merged into one loaded model, their scales, and the backend kept in step.

Every change (load, scale, unload) first checks the file against the model (names, shapes, DoRA
magnitudes) without touching a weight, then recomputes the affected weights from their originals
(merge.py) and tells the backend which components changed. A failure while merging rolls the affected
weights back to the previous state (recomputed the same way, so bit-identical) before the error is raised.
"""
from __future__ import annotations

import logging
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import deltas
from .errors import LoraError
from .formats import LoraFile, ModuleWeights, parse_lora
from .keymap import Target, build_targets, resolve_parameter
from .merge import ParamKey, Update, WeightMerger
from .tags import extract_lora_tags, file_hash, find_lora, short_hash

log = logging.getLogger(__name__)

MIN_MATCHED = 0.5  # strict loads refuse files of which fewer modules than this fraction fit the model
_FILE_CACHE: "OrderedDict[tuple, LoraFile]" = OrderedDict()  # parsed files, for prompt tags reused across calls
_FILE_CACHE_SIZE = 4


@dataclass
class LoadedLora:
    name: str
    path: Path
    hash: str
    scale: float  # UNet multiplier
    text_encoder_scale: float
    matched: list[tuple[Target, ModuleWeights]]
    modules: int  # adapter modules in the file (plus keys of no known layout)
    layout: str
    call_scoped: bool = False  # loaded by a prompt tag for one call
    unmatched: list[str] = field(default_factory=list)

    @property
    def params(self) -> set[ParamKey]:
        return {p for t, _ in self.matched for p in t.params}

    def info(self) -> dict:
        comps = [t.component for t, _ in self.matched]
        kinds = sorted({m.kind + ("+dora" if m.dora else "") for _, m in self.matched})
        return {"name": self.name, "path": str(self.path), "scale": self.scale,
                "text_encoder_scale": self.text_encoder_scale, "hash": short_hash(self.hash), "sha256": self.hash,
                "matched": len(self.matched), "modules": self.modules, "unet_modules": comps.count("unet"),
                "text_encoder_modules": comps.count("text_encoder"), "layout": self.layout, "kinds": kinds,
                "unmatched": list(self.unmatched[:10]), "from_prompt": self.call_scoped}


def _read(path: Path) -> LoraFile:
    st = path.stat() if path.is_file() else None
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns) if st else None
    if key in _FILE_CACHE:
        _FILE_CACHE.move_to_end(key)
        return _FILE_CACHE[key]
    parsed = parse_lora(path)
    _FILE_CACHE[key] = parsed
    while len(_FILE_CACHE) > _FILE_CACHE_SIZE:
        _FILE_CACHE.popitem(last=False)
    return parsed


def _finite(x, what: str) -> float:
    x = float(x)
    if not math.isfinite(x):
        raise LoraError(f"{what} must be a finite number, got {x}")
    return x


class LoraManager:
    """The adapters of one Pipeline. `backend` may offer `check_weights_changeable(components)` (raises
    before anything changes when its compiled graphs are fixed) and `reload(component)` (drops or refits
    what it compiled from the old weights); `on_change(components)`, when given, is called instead of
    reload (the Pipeline's, which reloads and forgets its CUDA graphs)."""

    def __init__(self, model, backend, lora_dirs=None, on_change=None):
        self.model = model
        self.backend = backend
        self.lora_dirs = [Path(d) for d in (lora_dirs or [])]
        self.on_change = on_change  # called with the changed components after the backend
        self.last_call: list[dict] = []  # what the last call's prompt tags applied (for the PNG parameters)
        self._loras: list[LoadedLora] = []
        self._targets: dict[str, Target] | None = None
        self._merger = WeightMerger(self._live)

    # ---- model side ------------------------------------------------------------------------------

    def original_weights(self, component: str) -> dict[str, torch.Tensor]:
        """{parameter name: original tensor} of what the adapters changed in `component` (the graph
        backends run their original-weights graph with the live values of these swapped in)."""
        return self._merger.originals_of(component)

    def _live(self, key: ParamKey) -> torch.Tensor:
        component, name = key
        return resolve_parameter(getattr(self.model, component), name)

    def targets(self) -> dict[str, Target]:
        if self._targets is None:
            self._targets = build_targets(self.model.config)
        return self._targets

    def _updates(self, loras: list[LoadedLora]) -> list[Update]:
        return [Update(t, m, lora.scale if t.component == "unet" else lora.text_encoder_scale, f"{lora.name}: {m.key}")
                for lora in loras for t, m in lora.matched]

    def _commit(self, loras: list[LoadedLora], keys: set[ParamKey]) -> None:
        """Make `loras` the active list, recomputing the weights in `keys`."""
        components = sorted({k[0] for k in keys})
        check = getattr(self.backend, "check_weights_changeable", None)
        if check is not None and components:
            check(components)
        previous = self._loras
        try:
            self._merger.merge(self._updates(loras), keys)
            self._loras = loras
            self._notify(components)
        except BaseException:
            self._merger.merge(self._updates(previous), keys)  # the same arithmetic: the previous bits
            self._loras = previous
            try:
                self._notify(components)
            except Exception as e:  # keep the first error; this one only says the runtime lags behind
                log.error("after a failed LoRA change the backend could not reload %s: %s", components, e)
            raise

    def _notify(self, components: list[str]) -> None:
        """The backend drops (or refits) what it compiled from these components' weights."""
        if not components:
            return
        if self.on_change is not None:
            self.on_change(components)
            return
        for component in components:
            if hasattr(self.backend, "reload"):
                self.backend.reload(component)

    # ---- the public operations -------------------------------------------------------------------

    def _unique(self, name: str) -> str:
        taken = {lora.name for lora in self._loras}
        if name not in taken:
            return name
        i = 2
        while f"{name}_{i}" in taken:
            i += 1
        return f"{name}_{i}"

    def _match(self, lf: LoraFile, name: str, strict: bool) -> tuple[list, list[str]]:
        table = self.targets()
        matched, unmatched = [], list(lf.foreign_keys)
        for mod in lf.modules:
            target = table.get(mod.key)
            if target is None:
                unmatched.append(mod.key)
            else:
                matched.append((target, mod))
        total = len(lf.modules) + len(lf.foreign_keys)
        if not matched:
            examples = [k for k in table if k.startswith(("lora_unet_", "lora_te_"))][:2]
            raise LoraError(f"{lf.path}: none of its {total} modules matches a module of this "
                            f"{self.model.config.name} model (file: {', '.join(unmatched[:3])}; the model's "
                            f"are e.g. {', '.join(examples)}). Is it a LoRA for another model family "
                            f"(SDXL, SD3, Flux)?")
        if len(matched) < total:
            msg = (f"{lf.path}: {len(matched)} of its {total} modules match this model; unmatched e.g. "
                   f"{', '.join(unmatched[:5])}")
            if strict and len(matched) < MIN_MATCHED * total:
                raise LoraError(msg + f". Fewer than {MIN_MATCHED:.0%} match, so it is most likely made for another "
                                      f"model; pass strict=False to apply the matching part anyway")
            log.warning("%s; the unmatched modules are skipped", msg)
        for target, mod in matched:  # shapes first, on the meta device: nothing computed, nothing written
            what = f"{lf.path.name}: {mod.key} -> {target.component}.{target.name}"
            delta = deltas.raw_delta(mod, "meta")
            deltas.fit(delta, target.shape, target.pad_channels, what)
            if mod.dora:
                m = mod.tensors["magnitude" if mod.dora == "peft" else "dora_scale"]
                deltas.magnitude_layout(tuple(m.shape), target.shape, mod.dora, what)
        return matched, unmatched

    def load(self, path, scale: float = 1.0, text_encoder_scale: float | None = None, strict: bool = True,
             name: str | None = None, call_scoped: bool = False) -> str:
        path = Path(path)
        scale = _finite(scale, "scale")
        te_scale = scale if text_encoder_scale is None else _finite(text_encoder_scale, "text_encoder_scale")
        lf = _read(path)
        matched, unmatched = self._match(lf, path.name, strict)
        lora = LoadedLora(self._unique(name or path.stem), path, file_hash(path, lf.metadata), scale, te_scale,
                          matched, len(lf.modules) + len(lf.foreign_keys), lf.layout, call_scoped, unmatched)
        self._commit(self._loras + [lora], lora.params)
        return lora.name

    def get(self, name: str) -> LoadedLora:
        for lora in self._loras:
            if lora.name == name:
                return lora
        raise LoraError(f"no LoRA named {name!r} is loaded; loaded: {', '.join(l.name for l in self._loras) or 'none'}")

    def set_scale(self, name: str, scale: float, text_encoder_scale: float | None = None) -> None:
        old = self.get(name)
        scale = _finite(scale, "scale")
        te_scale = scale if text_encoder_scale is None else _finite(text_encoder_scale, "text_encoder_scale")
        new = LoadedLora(**{**old.__dict__, "scale": scale, "text_encoder_scale": te_scale})
        self._commit([new if lora is old else lora for lora in self._loras], new.params)

    def unload(self, name: str | None = None) -> None:
        """One LoRA (its weights recomputed without it), or every one (all originals copied back)."""
        if name is not None:
            old = self.get(name)
            self._commit([lora for lora in self._loras if lora is not old], old.params)
            return
        check = getattr(self.backend, "check_weights_changeable", None)
        keys = self._merger.changed
        if check is not None and keys:
            check(sorted({k[0] for k in keys}))
        self._merger.restore_all()
        self._loras = []
        self._notify(sorted({k[0] for k in keys}))

    @property
    def loras(self) -> list[dict]:
        return [lora.info() for lora in self._loras]

    # ---- prompt tags, for one call ---------------------------------------------------------------

    def apply_prompt_tags(self, prompts: list[str]) -> list[str]:
        """Strip the tags from every prompt and load the first prompt's LoRAs for this call (A1111)."""
        cleaned, first = [], []
        for i, prompt in enumerate(prompts):
            text, tags = extract_lora_tags(prompt)
            cleaned.append(text)
            if i == 0:
                first = tags
            elif tags and [t.text for t in tags] != [t.text for t in first]:
                log.warning("prompt %d has other LoRA tags than the first prompt; as in A1111 the first prompt's "
                            "LoRAs apply to the whole batch", i)
        self.last_call = []
        for tag in first:
            path = find_lora(tag.name, self.lora_dirs)
            name = self.load(path, tag.unet_scale, tag.text_encoder_scale, name=tag.name, call_scoped=True)
            self.last_call.append({**self.get(name).info(), "name": tag.name})
        return cleaned

    def end_call(self) -> None:
        """Unload what prompt tags loaded for the call that just ended (also after an error)."""
        scoped = [lora for lora in self._loras if lora.call_scoped]
        if scoped:
            keys = set().union(*(lora.params for lora in scoped))
            self._commit([lora for lora in self._loras if not lora.call_scoped], keys)
