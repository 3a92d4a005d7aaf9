"""ONNX export of one component: trace, save (external data past 2 GB), check, infer shapes.

The pinned torch's TorchScript-based exporter is used: it keeps batch, height and width symbolic,
whereas the torch.export-based one specializes the UNet's skip-connection shapes to the traced size.
"""
from __future__ import annotations

import contextlib
import copy
import os
import tempfile
import warnings
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .graphs import COMPONENTS, DTYPES, Shape, graph_spec, latent_size, pixel_multiple

OPSET = 17
PROTOBUF_LIMIT = 2 * 1024**3  # a single ONNX protobuf cannot exceed 2 GiB: larger graphs keep weights beside it
DATA_SUFFIX = ".data"


def _require_onnx():
    try:
        import onnx
    except ImportError:
        raise RuntimeError("ONNX export needs the onnx package: pip install 'ldm_engine[onnx]'") from None
    return onnx


def _param_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


@contextlib.contextmanager
def _quiet_tracing():
    """The TorchScript exporter warns about its own deprecation and about python-constant shapes
    (which are intended here: the static parts of the graph). Keep the user's console clean."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        warnings.filterwarnings("ignore", message=".*will be removed.*")
        warnings.filterwarnings("ignore", message="Constant folding")
        yield


def graph_metadata(model, component: str, dtype: str, shape: Shape | None) -> dict[str, str]:
    """Stored in the graph's metadata_props: what a consumer (build_trt.py, a backend) needs to know
    about a graph without the model that made it."""
    from .. import __version__

    text = model.text_encoder.config.max_length if model.text_encoder is not None else 1
    return {"ldm_engine.version": __version__, "ldm_engine.component": component, "ldm_engine.dtype": dtype,
            "ldm_engine.shape": shape.tag() if shape else "dynamic",
            "ldm_engine.downsampling_factor": str(model.config.vae.downsampling_factor),
            "ldm_engine.pixel_multiple": str(pixel_multiple(model)),
            "ldm_engine.context_tokens": str(text), "ldm_engine.model": model.config.name,
            # whether the UNet and text encoder run the CFG pair (LCM-distilled models do not)
            "ldm_engine.cfg_batch": "0" if model.config.unet.time_cond_proj_dim is not None else "1"}


def export_component(model, component: str, path: str | os.PathLike, dtype: str = "fp32",
                     shape: Shape | None = None, opset: int = OPSET, progress: bool = True,
                     output_layer: int | None = None, controlnet=None) -> Path:
    """Write `component` of `model` (a LoadedModel) as ONNX at `path` (model.onnx; graphs over 2 GiB
    keep their weights in `path` + '.data'). `shape` None exports dynamic batch/height/width; a Shape
    exports a static graph. `output_layer`: the text encoder's last layer when not its own (clip skip);
    `controlnet`: the ControlNet module of the `controlnet` component (export/control_graphs.py).
    Returns the path. Nothing is left at `path` when a step fails."""
    onnx = _require_onnx()
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    path = Path(path)
    spec = graph_spec(model, component, shape, output_layer, controlnet)
    torch_dtype = DTYPES[dtype]
    module = spec.module.eval()
    if any(p.dtype != torch_dtype for p in module.parameters()):  # never cast the caller's modules in place
        module = copy.deepcopy(module).to(torch_dtype)
    example = tuple(x.to(torch_dtype) if n in spec.float_inputs else x for n, x in zip(spec.inputs, spec.example))
    bar = tqdm(total=4, desc=f"export {component}", unit="stage", disable=not progress, leave=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with tempfile.TemporaryDirectory(dir=path.parent, prefix=".export-") as tmp:
            raw = Path(tmp) / "traced.onnx"
            bar.set_postfix_str("trace")
            with torch.no_grad(), _quiet_tracing():
                torch.onnx.export(module, example, str(raw), dynamo=False, opset_version=opset,
                                  input_names=spec.inputs, output_names=spec.outputs,
                                  dynamic_axes=spec.dynamic_axes or None, do_constant_folding=True)
            bar.update()
            bar.set_postfix_str("save")
            proto = onnx.load(str(raw))  # pulls in any per-tensor files the exporter wrote
            meta = graph_metadata(model, component, dtype, shape)
            if output_layer is not None:
                meta["ldm_engine.output_layer"] = str(output_layer)
            onnx.helper.set_model_props(proto, meta)
            large = _param_bytes(module) >= PROTOBUF_LIMIT - 64 * 1024**2  # margin for the graph itself
            staged = Path(tmp) / path.name
            if large:
                onnx.save_model(proto, str(staged), save_as_external_data=True, all_tensors_to_one_file=True,
                                location=path.name + DATA_SUFFIX, size_threshold=1024)
            else:
                onnx.save_model(proto, str(staged))
            del proto
            bar.update()
            bar.set_postfix_str("check")
            onnx.checker.check_model(str(staged), full_check=False)
            bar.update()
            bar.set_postfix_str("infer shapes")
            onnx.shape_inference.infer_shapes_path(str(staged), str(staged))
            bar.update()
            data = staged.with_name(staged.name + DATA_SUFFIX)
            if data.exists():
                os.replace(data, path.with_name(path.name + DATA_SUFFIX))
            os.replace(staged, path)
    finally:
        bar.close()
    return path


def export_model(model, out_dir: str | os.PathLike, components=None, dtype: str = "fp32", shape: Shape | None = None,
                 progress: bool = True) -> dict[str, Path]:
    """Export several components into `out_dir` as <component>.onnx; returns {component: path}."""
    from .graphs import available_components

    have = available_components(model)
    components = list(components or have)
    for c in components:
        if c not in COMPONENTS:
            raise ValueError(f"unknown component {c!r}; choose from {', '.join(COMPONENTS)}")
        if c not in have:
            raise ValueError(f"this model has no {c}; it has {', '.join(have)}")
    if shape is not None:
        latent_size(model, shape)  # refuse a bad size before anything is written
    out_dir = Path(out_dir)
    return {c: export_component(model, c, out_dir / f"{c}.onnx", dtype, shape, progress=progress) for c in components}
