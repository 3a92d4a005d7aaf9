"""`build_info()`: what this installation can run."""
from __future__ import annotations

import importlib
import importlib.metadata


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def native_extension():
    """The compiled `ldm_engine._C`, or None when this is a source tree without a build."""
    try:
        return importlib.import_module("ldm_engine._C")
    except ImportError:
        return None


def build_info() -> dict:
    import torch

    from . import __version__
    from .export.cache import cache_root

    ext = native_extension()
    cuda = torch.cuda.is_available()
    return {
        "ldm_engine": __version__,
        "torch": torch.__version__,
        "torch_device": "cuda" if cuda else "cpu",
        "cuda_device": torch.cuda.get_device_name(0) if cuda else None,
        "native_extension": ext is not None,
        "native_cuda_compiled": bool(ext and ext.cuda_compiled()),
        "triton": _version("triton"),
        "onnx": _version("onnx"),
        "onnxruntime": _version("onnxruntime") or _version("onnxruntime-gpu"),
        "openvino": _version("openvino"),
        "tensorrt": _version("tensorrt"),
        "artifact_cache": str(cache_root()),  # exported graphs and engines ($LDM_ENGINE_CACHE overrides)
    }
