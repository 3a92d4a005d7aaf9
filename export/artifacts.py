"""ONNX graphs of a loaded model, exported on first use into the artifact cache."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import torch

from .cache import ArtifactCache, artifact_key, weights_hash
from .graphs import Shape
from .onnx_export import OPSET, export_component


def safe_part(text: str) -> str:
    """`text` with everything but letters, digits and . + _ replaced: usable inside a cache key."""
    return re.sub(r"[^A-Za-z0-9.+_]", "_", text)


def weights_component(component: str) -> str:
    """The model component whose weights (and config) a graph carries: the UNet for its ControlNet and
    step-cache variants."""
    from .step_cache_graphs import parse_cache_component

    return "unet" if component == "unet_control" or parse_cache_component(component) else component


def component_module(model, component: str) -> torch.nn.Module:
    modules = {"text_encoder": model.text_encoder, "unet": model.unet}
    return modules.get(weights_component(component), model.vae)


def onnx_runtime_tag() -> str:
    """What the exported bytes depend on besides the weights: this package, the exporter and the opset."""
    from .. import __version__

    return safe_part(f"ldm{__version__}_torch{torch.__version__.split('+')[0]}_opset{OPSET}")


def onnx_key(model, component: str, dtype: str = "fp32", shape: Shape | None = None,
             output_layer: int | None = None) -> str:
    """`output_layer` (the text encoder's, for clip skip) enters the key through the config it changes."""
    module = component_module(model, component)
    part_config = {"unet": model.config.unet, "vae_decoder": model.config.vae, "vae_encoder": model.config.vae,
                   "text_encoder": model.config.text_encoder}[weights_component(component)]
    if output_layer is not None and component == "text_encoder":
        part_config = dataclasses.replace(part_config, output_layer=output_layer)
    return artifact_key(component, weights_hash(module, part_config), shape.tag() if shape else "dynamic", dtype,
                        onnx_runtime_tag())


def onnx_artifact(model, component: str, dtype: str = "fp32", shape: Shape | None = None,
                  cache: ArtifactCache | None = None, progress: bool = True, output_layer: int | None = None) -> Path:
    """Path of `component`'s ONNX graph (model.onnx, maybe with model.onnx.data beside it) in the
    cache, exported now when missing or damaged. `output_layer`: the text encoder's last layer when
    not its own (clip skip): a graph of its own."""
    cache = cache or ArtifactCache()
    key = onnx_key(model, component, dtype, shape, output_layer)

    def build(folder: Path) -> dict:
        export_component(model, component, folder / "model.onnx", dtype, shape, progress=progress,
                         output_layer=output_layer)
        return {"component": component, "dtype": dtype, "shape": shape.tag() if shape else "dynamic",
                "source": str(model.source)}

    return cache.get_or_build("onnx", key, build) / "model.onnx"


def controlnet_key(model, net, dtype: str = "fp32", shape: Shape | None = None) -> str:
    """The cache key of ControlNet `net`'s graph: its own weights and config (not the UNet's), plus what
    of `model` the graph's metadata records (its autoencoder factor and prompt length)."""
    context = model.text_encoder.config.max_length if model.text_encoder is not None else 0
    config = {"controlnet": dataclasses.asdict(net.control_config),
              "downsampling_factor": model.config.vae.downsampling_factor, "context_tokens": context}
    return artifact_key("controlnet", weights_hash(net, config), shape.tag() if shape else "dynamic", dtype,
                        onnx_runtime_tag())


def controlnet_artifact(model, net, dtype: str = "fp32", shape: Shape | None = None,
                        cache: ArtifactCache | None = None, progress: bool = True) -> Path:
    """Path of ControlNet `net`'s ONNX graph (export/control_graphs.py) in the cache, exported now when
    missing or damaged; a second pipeline with the same ControlNet file finds it again."""
    cache = cache or ArtifactCache()

    def build(folder: Path) -> dict:
        export_component(model, "controlnet", folder / "model.onnx", dtype, shape, progress=progress, controlnet=net)
        return {"component": "controlnet", "dtype": dtype, "shape": shape.tag() if shape else "dynamic",
                "source": str(model.source)}

    return cache.get_or_build("onnx", controlnet_key(model, net, dtype, shape), build) / "model.onnx"
