"""The two graphs that run a ControlNet outside PyTorch (as diffusers' and ComfyUI's ControlNet paths
split it: one UNet graph then serves any number of ControlNets, each exported once):

    controlnet    sample (B, 4, h, w), timestep (B,) float32, context (B, L, D), hint (B, 3, H, W) in [0, 1],
                  [class_labels (B,) int64], [timestep_cond (B, time_cond_proj_dim)]
                                                   -> down_0 ... down_{n-1}, mid   (the residuals, unscaled)
    unet_control  the UNet graph's inputs + down_0 ... down_{n-1}, mid         -> model_output

Residual i of the input blocks has the channels of skip connection i and the latent size divided by
2^k at UNet level k (dynamic axes `height/2^k`, `width/2^k`); H, W = h, w x the autoencoder factor.
The conditioning scale (and guess mode's ramp over the residuals) is applied by the caller, so one
ControlNet graph serves every scale.

For measurement (benchmarks/control_layouts.py) there is also TensorRT demo/Diffusion's layout, one graph
holding the UNet and one ControlNet; the backends do not run it:

    unet_control_fused  the UNet graph's inputs + hint (B, 3, H, W) + control_scales (B, n) float32
                                                   -> model_output
control_scales holds one scale per residual for each batch row, so the conditioning scale, guess mode's
ramp and guess mode's unconditional half (rows of zeros: that half gets no control) all go in as data.

A graph folder (`python export/export_onnx.py --controlnet FILE ...`) holds unet_control.onnx, one
controlnet_<name>.onnx per ControlNet and `controlnets.json`, the index {name: graph file, weights hash,
file digest, source}. <name> is the name Pipeline.load_controlnet gives the same file: its stem (a
diffusers folder's name), made unique in the order given with _2, _3, ... A backend reading the folder
finds a loaded ControlNet's graph by that name and checks its weights hash, so another ControlNet under
the same name is refused instead of silently running the wrong graph.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from .graphs import FUSED_CONTROL, GraphSpec, Shape, UNetGraph, add_optional_unet_inputs, default_example_shape, graph_spec, latent_size


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


def matched_residuals(ucfg, control, z_shape) -> list[tuple[str, object, tuple]]:
    """(input name, residual, shape the UNet needs) for each of `control`'s residuals on latents of
    `z_shape`, checked: a residual of another shape is refused unless it is (B, C, 1, 1) (a global-pooling
    ControlNet), which the caller expands to the needed shape."""
    layout = residual_layout(ucfg)
    if len(control) != len(layout):
        raise ValueError(f"control needs {len(layout)} residuals (one per input block and the middle one), "
                         f"got {len(control)}")
    b, _, h, w = z_shape
    out = []
    for (name, ch, ds), r in zip(layout, control):
        want, shape = (b, ch, h // ds, w // ds), tuple(r.shape)
        if shape != want and (shape[:2] != want[:2] or shape[2:] != (1, 1)):
            raise ValueError(f"ControlNet residual {name} has shape {shape}, the UNet needs {want}")
        out.append((name, r, want))
    return out


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


class FusedControlGraph(nn.Module):
    """The UNet and one ControlNet in one graph: the residuals, times control_scales (B, n), go straight
    into the UNet's skip connections and middle block."""

    def __init__(self, unet_graph: UNetGraph, net):
        super().__init__()
        self.unet_graph, self.net = unet_graph, net
        self.net_channels = net.control_config.unet.in_channels

    def forward(self, sample, timestep, *rest):
        *unet_rest, hint, scales = rest
        g, rest = self.unet_graph, list(unet_rest)
        context = rest.pop(0) if g.has_context else None
        labels = rest.pop(0) if g.has_labels else None
        cond = rest.pop(0) if g.has_cond else None
        # an inpainting UNet's sample is [latents, mask, masked image]: its ControlNet reads the latents only
        residuals = self.net(sample[:, :self.net_channels], hint, timestep, context, class_labels=labels,
                             timestep_cond=cond)
        control = [r * scales[:, i, None, None, None].to(r.dtype) for i, r in enumerate(residuals)]
        return g.unet(sample, timestep, context, class_labels=labels, timestep_cond=cond, control=control)


def fused_control_spec(model, net, shape: Shape | None = None) -> GraphSpec:
    """The spec of the UNet + ControlNet `net` in one graph (inputs: the UNet graph's, hint, control_scales)."""
    if net.control_config.unet.time_cond_proj_dim != model.config.unet.time_cond_proj_dim or \
            (net.control_config.unet.num_classes is None) != (model.config.unet.num_classes is None):
        raise ValueError("a fused graph needs a ControlNet that takes the UNet's own optional inputs "
                         "(class labels, timestep_cond)")
    base = graph_spec(model, "unet", shape)
    sample = base.example[0]
    b2, h, w = sample.shape[0], sample.shape[2], sample.shape[3]
    f = net.hint_downsampling
    n = net.control_config.num_residuals
    names = list(base.inputs) + ["hint", "control_scales"]
    example = list(base.example) + [torch.rand(b2, net.control_config.hint_in_channels, h * f, w * f),
                                    torch.ones(b2, n)]
    axes = dict(base.dynamic_axes)
    if axes:
        axes |= {"hint": {0: "batch", 2: "pixel_height", 3: "pixel_width"}, "control_scales": {0: "batch"}}
    return GraphSpec(FUSED_CONTROL, FusedControlGraph(base.module, net), names, base.outputs, tuple(example), axes,
                     base.float_inputs + ("hint", "control_scales"))


CONTROL_INDEX = "controlnets.json"
_EXPORT_HINT = "python export/export_onnx.py --model MODEL --out {folder} --controlnet FILE [--controlnet FILE2 ...]"


def controlnet_weights_hash(net) -> str:
    """The identity of a ControlNet's weights (and config): what graph keys and graph folders match on."""
    from .cache import weights_hash

    return weights_hash(net, net.control_config)


def controlnet_file_hash(path) -> str:
    """A digest of a ControlNet file's bytes (a diffusers folder's weights file): which file a graph came from."""
    from ..control.loading import folder_weights
    from .cache import file_digest

    path = Path(path)
    return file_digest(path if path.is_file() else folder_weights(path))


def read_control_index(folder) -> dict[str, dict]:
    """{name: {graph, weights_hash, file_hash, source}} of a graph folder ({} when it has no ControlNets)."""
    path = Path(folder) / CONTROL_INDEX
    if not path.is_file():
        return {}
    try:
        return dict(json.loads(path.read_text())["controlnets"])
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"{path} is unreadable; export the ControlNet graphs again with "
                         f"{_EXPORT_HINT.format(folder=folder)}") from None


def load_controlnets(model, files) -> list:
    """ControlNet files read and checked as Pipeline.load_controlnet does, named as it names them, in
    order: [LoadedControlNet] (name, path, module)."""
    from ..backends.torch_backend import TorchBackend
    from ..control.manager import ControlNets

    loader = ControlNets(model, TorchBackend(model))
    for f in files:
        loader.load(f)
    return loader.loaded


def export_control_graphs(model, controlnets, out_dir, dtype: str = "fp32", shape: Shape | None = None,
                          progress: bool = True) -> dict[str, Path]:
    """Write unet_control.onnx and controlnet_<name>.onnx for each of `controlnets` (load_controlnets) into
    `out_dir` and record them in its controlnets.json (entries of earlier exports under other names are
    kept). Returns {graph stem: path}."""
    from .onnx_export import export_component

    out_dir = Path(out_dir)
    index = read_control_index(out_dir) if out_dir.is_dir() else {}
    paths = {"unet_control": export_component(model, "unet_control", out_dir / "unet_control.onnx", dtype, shape,
                                              progress=progress)}
    for c in controlnets:
        net = c.module.to(torch.float32)  # hashed as the graph backends hold it
        stem = f"controlnet_{c.name}"
        paths[stem] = export_component(model, "controlnet", out_dir / f"{stem}.onnx", dtype, shape, progress=progress,
                                       controlnet=net)
        index[c.name] = {"graph": f"{stem}.onnx", "weights_hash": controlnet_weights_hash(net),
                         "file_hash": controlnet_file_hash(c.path), "source": str(c.path)}
    tmp = out_dir / f".{CONTROL_INDEX}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps({"controlnets": index}, indent=1, sort_keys=True))
    os.replace(tmp, out_dir / CONTROL_INDEX)
    return paths


def find_control_graph(folder, name: str | None, weights: str) -> Path:
    """The graph of the ControlNet the pipeline named `name` (weights hash `weights`) in a graph folder;
    a clear error when the folder has none, or holds another ControlNet's graph under that name."""
    folder = Path(folder)
    fix = _EXPORT_HINT.format(folder=folder)
    if not (folder / "unet_control.onnx").is_file():
        raise FileNotFoundError(f"onnx_dir {folder} has no unet_control.onnx (the UNet taking ControlNet residuals); "
                                f"export the ControlNet graphs with {fix}")
    index = read_control_index(folder)
    entry = index.get(name) if name is not None else None
    if entry is None:
        have = ", ".join(sorted(index)) or "none"
        raise FileNotFoundError(f"onnx_dir {folder} has no graph for ControlNet {name!r} (it has: {have}); export it "
                                f"with {fix}, giving the files in the order the pipeline loads them (the names "
                                "follow that order)")
    if entry.get("weights_hash") != weights:
        same = [n for n, e in index.items() if e.get("weights_hash") == weights]
        where = (f"; its graph is there as {same[0]!r}: load the ControlNets in the order they were exported"
                 if same else f"; export this one with {fix}")
        raise ValueError(f"ControlNet {name!r} has other weights ({weights}) than the graph onnx_dir {folder} holds "
                         f"under that name ({entry.get('weights_hash')}, exported from {entry.get('source')}){where}")
    path = folder / entry["graph"]
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing (listed in {folder / CONTROL_INDEX}); export it again with {fix}")
    return path
