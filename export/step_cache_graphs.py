"""The two UNet graphs of the step cache (ldm_engine.optimize.step_cache, DeepCache), one pair per branch K:

    unet_deep_b<K>     the UNet graph's inputs -> model_output, cached_feature
                       (the whole UNet; cached_feature is the input of output block N-1-K)
    unet_shallow_b<K>  the UNet graph's inputs + cached_feature -> model_output
                       (input blocks 0..K, the cached feature, the last K+1 output blocks)

cached_feature (B, C, h / 2^k, w / 2^k) has the size of skip K (UNet level k) and the channels of what
comes up to output block N-1-K; both are read off the module at trace time.
"""
from __future__ import annotations

import re

import torch
from torch import nn

from .graphs import GraphSpec, Shape, graph_spec

_NAME = re.compile(r"^unet_(deep|shallow)_b(\d+)$")


def cache_component(kind: str, branch: int) -> str:
    """The component name of the step cache's `kind` ("deep" or "shallow") graph at `branch`."""
    return f"unet_{kind}_b{branch}"


def parse_cache_component(component: str) -> tuple[str, int] | None:
    """(kind, branch) of a step-cache component name, None for any other component."""
    m = _NAME.match(component)
    return (m.group(1), int(m.group(2))) if m else None


class _CacheGraph(nn.Module):
    """The UNet graph's inputs as tensors, run as the deep or the shallow half of a cached step."""

    def __init__(self, unet_graph, kind: str, branch: int):
        super().__init__()
        self.unet_graph, self.kind, self.branch = unet_graph, kind, branch

    def forward(self, sample, timestep, *rest):
        from ..optimize.step_cache import deep_forward, shallow_forward

        g, rest = self.unet_graph, list(rest)
        feature = rest.pop() if self.kind == "shallow" else None
        context = rest.pop(0) if g.has_context else None
        labels = rest.pop(0) if g.has_labels else None
        cond = rest.pop(0) if g.has_cond else None
        kw = dict(class_labels=labels, timestep_cond=cond)
        if feature is None:
            return deep_forward(g.unet, sample, timestep, context, self.branch, **kw)
        return shallow_forward(g.unet, sample, timestep, context, self.branch, feature, **kw)


def step_cache_spec(model, component: str, shape: Shape | None = None) -> GraphSpec:
    kind, branch = parse_cache_component(component)
    from ..optimize.step_cache import branch_count

    top = branch_count(model.config.unet) - 1
    if branch > top:
        raise ValueError(f"this UNet has cache branches 0 to {top}, not {branch}")
    base = graph_spec(model, "unet", shape)
    deep = _CacheGraph(base.module, "deep", branch)
    with torch.no_grad():
        _, feature = deep(*base.example)
    ds = base.example[0].shape[2] // feature.shape[2]
    axes = dict(base.dynamic_axes)
    if axes:
        spatial = {2: "height", 3: "width"} if ds == 1 else {2: f"height/{ds}", 3: f"width/{ds}"}
        axes["cached_feature"] = {0: "batch"} | spatial
    if kind == "deep":
        return GraphSpec(component, deep, list(base.inputs), list(base.outputs) + ["cached_feature"], base.example,
                         axes, base.float_inputs)
    return GraphSpec(component, _CacheGraph(base.module, "shallow", branch), list(base.inputs) + ["cached_feature"],
                     list(base.outputs), tuple(base.example) + (torch.randn_like(feature),), axes,
                     base.float_inputs + ("cached_feature",))
