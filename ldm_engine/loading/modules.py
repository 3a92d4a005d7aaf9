"""Building a reference module and filling it with weights, all or nothing."""
from __future__ import annotations

import torch
from torch import nn

from .errors import CheckpointError


def _first(items, n=5) -> str:
    shown = ", ".join(str(i) for i in items[:n])
    return shown + (f", ... ({len(items)} in all)" if len(items) > n else "")


def load_strict(build, sd: dict[str, torch.Tensor], what: str, source, dtype: torch.dtype = torch.float32) -> nn.Module:
    """`build()` makes the module (on the meta device, no memory); every parameter must come from `sd`
    with the right shape, and `sd` must hold nothing else, or a CheckpointError names the first offenders."""
    with torch.device("meta"):
        module = build()
    expected = module.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    shapes = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(v.shape)}"
              for k, v in expected.items() if k in sd and sd[k].shape != v.shape]
    problems = []
    if missing:
        problems.append(f"missing keys: {_first(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_first(unexpected)}")
    if shapes:
        problems.append(f"shape mismatches: {_first(shapes, 3)}")
    if problems:
        raise CheckpointError(f"{source}: the {what} weights do not fit its architecture; " + "; ".join(problems)
                              + ". Is the config right for this file (pass config=<preset or YAML>)?")
    state = {k: (sd[k].to(dtype) if sd[k].is_floating_point() else sd[k]) for k in expected}
    module.load_state_dict(state, assign=True)
    return module.eval().requires_grad_(False)
