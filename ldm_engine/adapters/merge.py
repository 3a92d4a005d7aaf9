"""Merging adapter updates into the live weights, and restoring them bit-exactly.

Before a parameter is first changed its original is cloned; every merged weight is recomputed from that
clone (float32, every active adapter applied in load order, cast to the parameter's dtype) and copied
into the parameter in place, so runtimes holding the tensor (CUDA graphs) see the change. A parameter
no adapter touches any more gets its clone copied back, bit for bit; deltas are never subtracted.

Parameters are recomputed group by group (a group is the parameters one fused q/k/v update spans) to
bound the float32 working memory to one group at a time.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from . import deltas
from .errors import LoraError
from .formats import ModuleWeights
from .keymap import Target

ParamKey = tuple[str, str]  # (component, parameter name)


@dataclass
class Update:
    """One module of one adapter, matched to its target, at the adapter's multiplier for that component."""

    target: Target
    module: ModuleWeights
    multiplier: float
    what: str  # "<adapter name>: <module>" for messages


class WeightMerger:
    def __init__(self, resolve: Callable[[ParamKey], torch.Tensor]):
        self._resolve = resolve  # ParamKey -> the live parameter
        self._originals: dict[ParamKey, torch.Tensor] = {}

    @property
    def changed(self) -> set[ParamKey]:
        """Parameters that currently differ from (or may differ from) their originals."""
        return set(self._originals)

    def originals_of(self, component: str) -> dict[str, torch.Tensor]:
        """{parameter name: original tensor} of `component`'s parameters changed since the load."""
        return {name: t for (c, name), t in self._originals.items() if c == component}

    def original(self, key: ParamKey) -> torch.Tensor:
        return self._originals[key] if key in self._originals else self._resolve(key).detach()

    @torch.no_grad()
    def merge(self, updates: list[Update], keys: set[ParamKey]) -> None:
        """Recompute the parameters in `keys` (grown to whole groups) from their originals with every
        update that touches them, in list order. Raises LoraError (nothing written for the failing
        group) when a merged weight is not finite in the parameter's dtype."""
        keys = set(keys)
        while True:  # close over fused targets: a q/k/v update pulls in k and v, and whatever touches those
            touching = [u for u in updates if keys.intersection(u.target.params)]
            grown = keys.union(*(u.target.params for u in touching))
            if grown == keys:
                break
            keys = grown
        for group, members in _groups(keys, touching):
            work = {k: self.original(k).float() for k in group}
            for u in members:
                stacked = torch.cat([work[k] for k in u.target.params]) if len(u.target.params) > 1 \
                    else work[u.target.params[0]]
                new = deltas.apply(stacked, u.module, u.multiplier, u.target.pad_channels, u.what)
                if not torch.isfinite(new).all() and torch.isfinite(stacked).all():
                    raise LoraError(f"{u.what}: the merged weight {u.target.component}.{u.target.name} overflows to "
                                    f"NaN or inf (the scale {u.multiplier:g} is too large); lower the scale")
                rows = [work[k].shape[0] for k in u.target.params]
                for k, part in zip(u.target.params, new.split(rows)):
                    work[k] = part
            results = {}
            for k in group:
                live = self._resolve(k)
                if not members:  # nothing applies any more: the original, bit for bit
                    results[k] = None
                    continue
                value = work[k].to(live.dtype)
                # float32 values were checked per update above; a narrower dtype can still overflow in the cast
                if (live.dtype != torch.float32 and not torch.isfinite(value).all()
                        and torch.isfinite(self.original(k)).all()):
                    culprit = [u.what for u in members if k in u.target.params][-1]
                    raise LoraError(f"{culprit}: the merged weight {k[0]}.{k[1]} has NaN or inf in {live.dtype} "
                                    f"(the scale is too large for this precision); lower the scale")
                results[k] = value
            for k, value in results.items():
                live = self._resolve(k)
                if value is None:
                    if k in self._originals:
                        live.copy_(self._originals.pop(k))
                    continue
                if k not in self._originals:
                    self._originals[k] = live.detach().clone()
                live.copy_(value)

    @torch.no_grad()
    def restore_all(self) -> set[ParamKey]:
        """Every changed parameter back to its original; returns the keys that were restored."""
        keys = set(self._originals)
        for k in keys:
            self._resolve(k).copy_(self._originals.pop(k))
        return keys


def _groups(keys: set[ParamKey], updates: list[Update]):
    """[(parameter group, its updates in order)]: keys grown by every update that spans several parameters."""
    owner: dict[ParamKey, int] = {}
    groups: list[set[ParamKey]] = []
    for k in sorted(keys):
        owner[k] = len(groups)
        groups.append({k})
    for u in updates:  # merge the groups one update spans (union of small sets; few fused targets)
        ids = set()
        for k in u.target.params:
            if k not in owner:
                owner[k] = len(groups)
                groups.append({k})
            ids.add(owner[k])
        root = min(ids)
        for i in ids - {root}:
            for k in groups[i]:
                owner[k] = root
            groups[root] |= groups[i]
            groups[i] = set()
    members: dict[int, list[Update]] = {}
    for u in updates:
        members.setdefault(owner[u.target.params[0]], []).append(u)
    return [(g, members.get(i, [])) for i, g in enumerate(groups) if g]
