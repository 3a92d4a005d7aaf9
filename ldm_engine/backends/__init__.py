"""Backends: the same callables (text encoder, UNet, autoencoder) served by different runtimes.

    torch        the reference modules, eagerly (Triton kernels swapped in on CUDA)
    onnxruntime  the exported ONNX graphs on ONNX Runtime
    openvino     the exported ONNX graphs on OpenVINO (bf16 where the CPU supports it)
    tensorrt     engines built by `python export/build_trt.py`, on a CUDA GPU
"""
from __future__ import annotations

import torch

from .torch_backend import TorchBackend


def _onnxruntime(*a, **k):
    from .onnxruntime_backend import OnnxRuntimeBackend

    return OnnxRuntimeBackend(*a, **k)


def _openvino(*a, **k):
    from .openvino_backend import OpenVINOBackend

    return OpenVINOBackend(*a, **k)


def _tensorrt(*a, **k):
    from .tensorrt_backend import TensorRTBackend

    return TensorRTBackend(*a, **k)


# constructors import their runtime only when chosen: `import ldm_engine` needs none of them
BACKENDS = {"torch": TorchBackend, "onnxruntime": _onnxruntime, "openvino": _openvino, "tensorrt": _tensorrt}


def check_int8(name: str, dtype) -> None:
    """dtype="int8" is the OpenVINO backend's (NNCF-quantized graphs): a clear error anywhere else."""
    if (dtype == "int8" or dtype is torch.int8) and name != "openvino":
        raise ValueError(f"dtype='int8' runs on backend='openvino' (graphs quantized with NNCF), not on {name!r}; "
                         "use backend='openvino' or a floating-point dtype")


def make_backend(name: str, model, device="cpu", dtype=None, **options):
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)}")
    check_int8(name, dtype)
    return BACKENDS[name](model, device=device, dtype=dtype, **options)


__all__ = ["BACKENDS", "TorchBackend", "check_int8", "make_backend"]
