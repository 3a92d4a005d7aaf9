"""Which `ldm-bench` configurations run here: the backends usable on this device (and why each other one
is not), each in the precisions worth timing on this CPU."""
from __future__ import annotations

import importlib.util

import torch

DEFAULT_DTYPES = {"torch": "fp32", "onnxruntime": "fp32", "openvino": "auto", "tensorrt": "fp16"}  # --quick
_INSTALL = {"onnxruntime": "pip install 'ldm_engine[onnx]'", "openvino": "pip install 'ldm_engine[openvino]'",
            "tensorrt": "pip install 'ldm_engine[tensorrt]'"}
_RUNTIMES = {"onnxruntime": ("onnx", "onnxruntime"), "openvino": ("onnx", "openvino"), "tensorrt": ("onnx", "tensorrt")}


def configs_for(backend_arg: str, dtype: str, device: str, quick: bool = False,
                native_bf16: bool = True) -> tuple[list[tuple[str, str]], list[str]]:
    """([(backend, dtype)] to run, [why each left-out one is skipped]). 'all' = every backend usable
    here; a comma list names backends, and one that cannot run here is a ValueError. dtype 'auto': each
    backend in fp32 and in its reduced precision (bf16 only where the CPU has bf16 instructions:
    `native_bf16`); `quick`: each backend once, in its default precision."""
    from .backends import BACKENDS

    names = list(BACKENDS) if backend_arg == "all" else backend_arg.split(",")
    for n in names:
        if n not in BACKENDS:
            raise ValueError(f"unknown backend {n!r}; choose from {', '.join(BACKENDS)} or all")
    skipped = []
    for n in list(names):
        reason = unusable_reason(n, device)
        if reason is None:
            continue
        if backend_arg != "all":
            raise ValueError(f"--backend {n} cannot run here: {reason}")
        skipped.append(f"{n}: skipped ({reason})")
        names.remove(n)
    if dtype == "int8":  # NNCF-quantized graphs: the OpenVINO backend's alone
        others = [n for n in names if n != "openvino"]
        if backend_arg != "all" and others:
            raise ValueError(f"--dtype int8 runs on openvino only (graphs quantized with NNCF), not on {', '.join(others)}")
        skipped += [f"{n}: skipped (--dtype int8 runs on openvino only)" for n in others]
        return [("openvino", "int8")] if "openvino" in names else [], skipped
    if dtype != "auto":
        return [(n, dtype) for n in names], skipped
    if quick:
        return [(n, DEFAULT_DTYPES[n]) for n in names], skipped
    no_bf16 = "this CPU has no bf16 instructions (AVX512_BF16 or AMX); --dtype bf16 times it anyway"
    out = []
    for n in names:
        if n == "torch":
            out.append(("torch", "fp32"))
            if device != "cpu":
                out.append(("torch", "fp16"))
            elif native_bf16:
                out.append(("torch", "bf16"))
            else:
                skipped.append(f"torch bf16: skipped ({no_bf16}: emulated, it runs far slower than fp32)")
        elif n == "openvino":
            out.append(("openvino", "fp32"))
            if native_bf16:
                out.append(("openvino", "auto"))
            else:
                skipped.append(f"openvino bf16: skipped ({no_bf16}: its auto precision here is the fp32 above)")
        else:
            out.append((n, DEFAULT_DTYPES[n]))
    return out, skipped


def unusable_reason(name: str, device: str) -> str | None:
    """Why backend `name` cannot run on `device` here (a missing runtime names its pip extra), or None."""
    cuda = device.startswith("cuda")
    if (cuda or name == "tensorrt") and not torch.cuda.is_available():
        return "no CUDA device"
    if name == "tensorrt" and not cuda:
        return "it runs on CUDA only: --device cuda"
    if name == "openvino" and device != "cpu":
        return "it runs on the CPU here: --device cpu"
    missing = [m for m in _RUNTIMES.get(name, ()) if importlib.util.find_spec(m) is None]
    if missing:
        return f"{' and '.join(missing)} not installed: {_INSTALL[name]}"
    return None
