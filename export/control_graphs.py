"""The two graphs that run a ControlNet outside PyTorch (as diffusers' and ComfyUI's ControlNet paths
split it, rather than TensorRT demo's fused UNet + ControlNet graph: one UNet graph then serves any
number of ControlNets, each exported once):

    controlnet    sample (B, 4, h, w), timestep (B,) float32, context (B, L, D), hint (B, 3, H, W) in [0, 1],
                  [class_labels (B,) int64], [timestep_cond (B, time_cond_proj_dim)]
                                                   -> down_0 ... down_{n-1}, mid   (the residuals, unscaled)
    unet_control  the UNet graph's inputs + down_0 ... down_{n-1}, mid         -> model_output

Residual i of the input blocks has the channels of skip connection i and the latent size divided by
2^k at UNet level k (dynamic axes `height/2^k`, `width/2^k`); H, W = h, w x the autoencoder factor.
The conditioning scale (and guess mode's ramp over the residuals) is applied by the caller, so one
ControlNet graph serves every scale.
"""
from __future__ import annotations

import torch
from torch import nn

from .graphs import GraphSpec, Shape, UNetGraph, add_optional_unet_inputs, default_example_shape, graph_spec, latent_size


def residual_layout(ucfg) -> list[tuple[str, int, int]]:
    """(input name, channels, downsampling) of each residual a ControlNet adds to a UNet of config
    `ucfg`: one per input block (down_0 ... down_{n-1}) and the middle block's (mid) last."""
    mc = ucfg.model_channels
    out, ch, ds = [(mc, 1)], mc, 1
    for level, mult in enumerate(ucfg.channel_mult):
        ch = mult * mc
        out += [(ch, ds)] * ucfg.num_res_blocks
        if level != len(ucfg.channel_mult) - 1:
            ds *= 2
            out.append((ch, ds))
    out.append((ch, ds))
    return [(f"down_{i}", c, d) for i, (c, d) in enumerate(out[:-1])] + [("mid", *out[-1])]


def _spatial_axes(ds: int) -> dict[int, str]:
    return {2: "height", 3: "width"} if ds == 1 else {2: f"height/{ds}", 3: f"width/{ds}"}


class ControlNetGraph(nn.Module):
    """A ControlNet with every input a tensor; its residuals as separate outputs, at scale 1."""

    def __init__(self, net, has_labels: bool, has_cond: bool):
        super().__init__()
        self.net, self.has_labels, self.has_cond = net, has_labels, has_cond

    def forward(self, sample, timestep, context, hint, *rest):
        rest = list(rest)
        labels = rest.pop(0) if self.has_labels else None
        cond = rest.pop(0) if self.has_cond else None
        return tuple(self.net(sample, hint, timestep, context, class_labels=labels, timestep_cond=cond))


def controlnet_spec(model, net, shape: Shape | None = None) -> GraphSpec:
    """The spec of ControlNet `net` (loaded for `model`): dynamic batch, size and tokens when `shape` is
    None, else static at the CFG batch (2 x shape.batch) of that image size."""
    ucfg = net.control_config.unet
    if not ucfg.context_dim:
        raise ValueError("a ControlNet graph needs a text-conditioned ControlNet (context_dim set)")
    dynamic = shape is None
    s = default_example_shape(model) if dynamic else shape
    h, w = latent_size(model, s)
    f = net.hint_downsampling
    b2 = 2 * s.batch
    length = model.text_encoder.config.max_length if model.text_encoder is not None else 77
    names = ["sample", "timestep", "context", "hint"]
    example = [torch.randn(b2, ucfg.in_channels, h, w), torch.full((b2,), 500.0),
               torch.randn(b2, length, ucfg.context_dim), torch.rand(b2, net.control_config.hint_in_channels, h * f, w * f)]
    axes = {"sample": {0: "batch", 2: "height", 3: "width"}, "timestep": {0: "batch"},
            "context": {0: "batch", 1: "tokens"}, "hint": {0: "batch", 2: "pixel_height", 3: "pixel_width"}}
    has_labels, has_cond = ucfg.num_classes is not None, ucfg.time_cond_proj_dim is not None
    add_optional_unet_inputs(ucfg, b2, names, example, axes)
    outputs = []
    for name, _, ds in residual_layout(ucfg):
        outputs.append(name)
        # a global-pooling ControlNet's residuals are (B, C, 1, 1): only the batch is dynamic
        axes[name] = {0: "batch"} | ({} if net.control_config.global_pool else _spatial_axes(ds))
    floats = tuple(n for n in names if n in ("sample", "context", "hint", "timestep_cond"))
    return GraphSpec("controlnet", ControlNetGraph(net, has_labels, has_cond), names, outputs, tuple(example),
                     axes if dynamic else {}, floats)


def unet_control_spec(model, shape: Shape | None = None) -> GraphSpec:
    """The UNet graph's spec with the residuals as extra inputs after the UNet's own."""

    base = graph_spec(model, "unet", shape)
    ucfg = model.config.unet
    sample = base.example[0]
    b2, h, w = sample.shape[0], sample.shape[2], sample.shape[3]
    names, example, axes = list(base.inputs), list(base.example), dict(base.dynamic_axes)
    layout = residual_layout(ucfg)
    for name, ch, ds in layout:
        names.append(name)
        example.append(torch.randn(b2, ch, h // ds, w // ds))
        if base.dynamic_axes:
            axes[name] = {0: "batch"} | _spatial_axes(ds)
    g = base.module
    module = UNetGraph(g.unet, g.has_context, g.has_labels, g.has_cond, residuals=len(layout))
    return GraphSpec("unet_control", module, names, base.outputs, tuple(example), axes,
                     base.float_inputs + tuple(n for n, _, _ in layout))
