"""New weights for an exported graph without exporting it again.

A LoRA (or any in-place weight edit) changes a few hundred of a UNet's tensors; exporting the whole
graph again costs a minute at SD-1.5 size. Instead, the graph's initializers are matched once to the
module's parameters, and a runtime is handed replacement arrays for the changed ones when it builds
its session: ONNX Runtime through `SessionOptions.add_initializer`, OpenVINO by swapping the Constant
nodes of the model it read (its ONNX frontend names them after the initializers).

The match is by content, not by name: the TorchScript exporter names Linear weights after the MatMul
that consumes them (`onnx::MatMul_123`) and stores them transposed (in, out), while conv weights keep
their module path. A parameter matches the initializer that holds its exact values, as they are or
transposed; each gets a short fingerprint first so only candidates are compared in full.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

# ONNX Runtime ignores overriding initializers under ORT_ENABLE_ALL (its layout transformers read the
# model's own weights first: the session silently runs the old ones); up to ORT_ENABLE_EXTENDED the
# overrides are honoured, so add_to_session_options lowers the level (tests/test_weight_overrides.py).

_PROBES = 16  # values sampled per tensor for its fingerprint


def _fingerprint(a: np.ndarray) -> tuple:
    flat = a.reshape(-1)
    idx = np.linspace(0, flat.size - 1, min(_PROBES, flat.size)).astype(np.int64)
    return a.shape, a.dtype.str, flat[idx].tobytes()


def _initializers(onnx_path: Path):
    """name -> numpy array of each initializer (external data memory-mapped, not copied)."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(onnx_path), load_external_data=False)
    for init in proto.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in init.external_data}
            dtype = onnx.helper.tensor_dtype_to_np_dtype(init.data_type)
            count = int(np.prod(init.dims)) if len(init.dims) else 1
            arr = np.memmap(onnx_path.parent / info["location"], dtype=dtype, mode="r",
                            offset=int(info.get("offset", 0)), shape=(count,)).reshape(tuple(init.dims))
        else:
            arr = numpy_helper.to_array(init)
        yield init.name, arr


def build_weight_map(onnx_path: str | Path, module: torch.nn.Module, dtype: torch.dtype | None = None) -> dict:
    """{parameter name: [initializer name, transposed]} for every 2-D and 4-D parameter of `module`
    (the Linear and conv weights a LoRA can touch) that the graph holds unchanged. `dtype`: the dtype
    the graph was exported in (its initializers are compared in it)."""
    wanted: dict[tuple, list[tuple[str, bool, torch.Tensor]]] = {}
    for name, p in module.named_parameters():
        if p.ndim not in (2, 4):
            continue
        a = p.detach().to(dtype or p.dtype).cpu()
        a = a.float().numpy() if a.dtype == torch.bfloat16 else a.numpy()
        wanted.setdefault(_fingerprint(a), []).append((name, False, a))
        if a.ndim == 2:
            wanted.setdefault(_fingerprint(np.ascontiguousarray(a.T)), []).append((name, True, a))
    found: dict[str, list] = {}
    for init_name, arr in _initializers(Path(onnx_path)):
        if arr.dtype == np.uint16:  # bf16 initializers: compare as float32
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        for name, transposed, a in wanted.get(_fingerprint(np.asarray(arr)), []):
            if name not in found and np.array_equal(arr, a.T if transposed else a):
                found[name] = [init_name, transposed]
    return found


def replacement_arrays(weight_map: dict, tensors: dict[str, torch.Tensor], np_dtype=np.float32) -> dict[str, np.ndarray]:
    """{initializer name: array} for the given {parameter name: new value}, laid out as the graph holds
    them. A parameter the graph does not hold unchanged (folded into another constant) raises: the
    caller then exports the graph again instead."""
    missing = [n for n in tensors if n not in weight_map]
    if missing:
        raise KeyError(f"{len(missing)} changed tensors have no initializer of their own in the graph "
                       f"(e.g. {missing[0]}); export it again")
    out = {}
    for name, value in tensors.items():
        init_name, transposed = weight_map[name]
        a = value.detach().float().cpu()
        out[init_name] = np.ascontiguousarray((a.T if transposed else a).numpy().astype(np_dtype, copy=False))
    return out


def add_to_session_options(so, arrays: dict[str, np.ndarray]) -> list:
    """ONNX Runtime: override these initializers in the sessions made with `so`, and lower its graph
    optimization to the highest level that honours overrides. Returns the OrtValues, which must stay
    alive as long as the session (ONNX Runtime does not copy them)."""
    import onnxruntime as ort

    if so.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    keep = []
    for name, arr in arrays.items():
        value = ort.OrtValue.ortvalue_from_numpy(arr)
        so.add_initializer(name, value)
        keep.append((arr, value))
    return keep


def replace_constants(ov_model, arrays: dict[str, np.ndarray]) -> int:
    """OpenVINO: swap the Constant nodes named after these initializers for new ones holding `arrays`
    (in the constant's own element type). Returns how many were replaced; raises when one is missing."""
    import openvino as ov

    todo = dict(arrays)
    for op in ov_model.get_ops():
        if op.get_type_name() != "Constant" or op.get_friendly_name() not in todo:
            continue
        name = op.get_friendly_name()
        arr = todo.pop(name)
        element = op.get_output_element_type(0)
        new = ov.opset13.constant(arr, dtype=element)
        new.set_friendly_name(name)
        new.output(0).set_names(op.output(0).get_names())
        for target in list(op.output(0).get_target_inputs()):  # every consumer reads the new constant
            target.replace_source_output(new.output(0))
    if todo:
        raise KeyError(f"{len(todo)} initializers are not constants of this OpenVINO model (e.g. {next(iter(todo))})")
    return len(arrays)

