"""The UNet graphs of the model's own weights, reused after a LoRA changes some of them.

A LoRA merged into the UNet changes a few hundred tensors; exporting SD-1.5's UNet again takes about a
minute. Instead, the graph backends keep the graph exported from the *original* weights (the artifact
cache key hashes them, so this is the graph a fresh load finds) and hand the runtime replacements for
the changed tensors when it builds its session (export/weight_overrides.py). Unloading every LoRA
leaves no replacements: the original graph runs as it is.

`original_weights(component) -> {parameter name: original tensor}` names what changed since the load
(the Pipeline wires it to its LoRA manager, which keeps those originals to restore them bit-exactly).
Both UNet graphs take this path: `unet` and `unet_control` (the UNet taking ControlNet residuals), whose
initializers are the same UNet parameters (matched by content, so graph names never matter).
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Callable

import numpy as np
import torch

log = logging.getLogger(__name__)

IN_PLACE = ("unet", "unet_control")  # the text encoder re-exports in seconds, and textual inversion resizes its table
WEIGHTS_OF = {"unet_control": "unet"}  # graph component -> the model component whose parameters it holds


@contextlib.contextmanager
def swapped_in(module: torch.nn.Module, tensors: dict[str, torch.Tensor]):
    """Temporarily point these parameters of `module` at other tensors (no copies)."""
    from ..adapters.keymap import resolve_parameter

    saved = []
    try:
        for name, value in tensors.items():
            p = resolve_parameter(module, name)
            saved.append((p, p.data))
            p.data = value
        yield
    finally:
        for p, data in reversed(saved):
            p.data = data


class BaseGraphs:
    def __init__(self):
        self.original_weights: Callable[[str], dict[str, torch.Tensor]] | None = None
        self._paths: dict[str, Path] = {}  # component -> graph of the original weights
        self._maps: dict[Path, dict] = {}
        self._refused: set[str] = set()  # components whose changes the graph cannot take: re-export instead

    def applies(self, component: str) -> bool:
        return component in IN_PLACE and self.original_weights is not None and component not in self._refused

    def _originals(self, component: str) -> dict[str, torch.Tensor]:
        return self.original_weights(WEIGHTS_OF.get(component, component))

    def path(self, component: str, module: torch.nn.Module, export: Callable[[], Path]) -> Path:
        """The graph of `module`'s original weights (exported with the originals swapped in, once)."""
        if component not in self._paths:
            with swapped_in(module, self._originals(component)):
                self._paths[component] = export()
        return self._paths[component]

    def overrides(self, component: str, module: torch.nn.Module, np_dtype=np.float32) -> dict[str, np.ndarray]:
        """{initializer name: array} for every parameter changed since the load (empty when none). A change
        the graph cannot take (a tensor folded into another constant) raises KeyError and turns the
        in-place path off for `component`: the caller then resolves a freshly exported graph."""
        from ..adapters.keymap import resolve_parameter
        from ..export import weight_overrides as wo

        changed = self._originals(component)
        if not changed:
            return {}
        path = self._paths[component]
        if path not in self._maps:  # matched on the values the graph was exported with
            with swapped_in(module, changed):
                self._maps[path] = wo.build_weight_map(path, module)
        live = {name: resolve_parameter(module, name) for name in changed}
        try:
            return wo.replacement_arrays(self._maps[path], live, np_dtype)
        except KeyError as e:
            log.warning("the %s graph cannot take the changed weights in place (%s); exporting it again", component, e)
            self._refused.add(component)
            self._paths.pop(component, None)
            raise
