"""Parity of an exported graph against the torch module it came from: both run on the same inputs,
at a shape other than the traced one (so dynamic axes are exercised too)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .graphs import Shape, graph_spec, latent_size


def probe_shape(model, shape: Shape | None) -> Shape:
    """The static shape itself, or for dynamic graphs a shape unlike the traced one (batch 2, not square)."""
    if shape is not None:
        return shape
    f = model.config.vae.downsampling_factor
    return Shape(8 * f, 12 * f, 2)


def onnx_parity(model, component: str, path: str | Path, shape: Shape | None = None, seed: int = 0,
                controlnet=None) -> float:
    """Max abs difference between ONNX Runtime (CPU) running `path` and the torch module, fp32 inputs, over
    every output (a ControlNet graph's residuals: `controlnet` is its module)."""
    import onnxruntime as ort

    probe = probe_shape(model, shape)
    latent_size(model, probe)
    spec = graph_spec(model, component, probe, controlnet=controlnet)
    g = torch.Generator().manual_seed(seed)
    inputs = []
    for name, x in zip(spec.inputs, spec.example):
        if name == "input_ids":
            vocab = model.text_encoder.config.vocab_size
            x = torch.randint(0, vocab, x.shape, generator=g)
        elif name == "class_labels":
            x = torch.randint(0, model.config.unet.num_classes, x.shape, generator=g)
        elif name == "timestep":
            x = torch.randint(0, 1000, x.shape, generator=g).float()
        else:
            x = torch.randn(x.shape, generator=g).clamp(-3, 3) if name != "image" else torch.rand(x.shape, generator=g) * 2 - 1
        inputs.append(x)
    module = spec.module
    dtype = next(module.parameters()).dtype
    with torch.no_grad():
        ref = module(*[x.to(dtype) if x.is_floating_point() else x for x in inputs])
    refs = [r.float().numpy() for r in (ref if isinstance(ref, (tuple, list)) else [ref])]
    from ..backends.onnxruntime_backend import session_options

    so = session_options()
    so.log_severity_level = 3
    session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    feeds = {}
    for arg, x in zip(session.get_inputs(), inputs):
        a = x.numpy()
        if arg.type == "tensor(float16)":
            a = a.astype(np.float16)
        feeds[arg.name] = a
    err = 0.0
    for out, ref in zip(session.run(None, feeds), refs):
        if out.shape != ref.shape:
            raise AssertionError(f"{component}: ONNX output shape {out.shape} differs from torch {ref.shape}")
        err = max(err, float(np.abs(out.astype(np.float32) - ref).max()))
    return err
