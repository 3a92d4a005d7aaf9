"""New weights for built TensorRT engines (after a LoRA change) without rebuilding them.

An engine built refittable (`python export/build_trt.py --refit`, or TensorRTBackend(refit=True)) keeps
its kernels and takes new values for its weights. TensorRT's ONNX parser names each engine weight after
the ONNX initializer it came from, and the exporter is deterministic, so a graph exported from the
changed model says what every weight is now. `refit_plan` compares that graph with the one the engine
holds (structure must match: same nodes, same initializer names, dtypes and shapes) and lists the
initializers whose bytes differ: only those are handed to the refitter. It needs no GPU; `refit_engine`
is the thin part that does.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..export.trt_engines import EngineError

# ONNX TensorProto data types -> (numpy dtype of the raw bytes, TensorRT DataType name)
_ONNX_TYPES = {1: (np.float32, "FLOAT"), 10: (np.float16, "HALF"), 16: (np.uint16, "BF16"), 6: (np.int32, "INT32"),
               7: (np.int64, "INT64"), 3: (np.int8, "INT8"), 9: (np.bool_, "BOOL")}
_FLOAT_TYPES = (1, 10, 16)


@dataclass(frozen=True)
class GraphWeights:
    """What a refit needs to know of one exported graph: its structure and each initializer's bytes."""

    path: Path
    structure: tuple  # (op types of the nodes, in order)
    weights: dict[str, tuple[int, tuple[int, ...], str]]  # name -> (ONNX data type, shape, sha256 of the bytes)


@dataclass(frozen=True)
class RefitPlan:
    changed: tuple[str, ...]  # initializers whose values differ: the weights to set
    unchanged: int
    exact: bool = True  # False: the engine's graph was unknown, `changed` holds every float initializer

    @property
    def empty(self) -> bool:
        return not self.changed


def _load(path: Path):
    import onnx

    return onnx.load(str(path), load_external_data=True)


def _raw(tensor) -> np.ndarray:
    """An initializer's values as a flat numpy array of its own width (bf16 as uint16 bits)."""
    from onnx import numpy_helper

    np_type, _ = _ONNX_TYPES.get(tensor.data_type, (None, None))
    if np_type is None:
        raise EngineError(f"initializer {tensor.name!r} has ONNX data type {tensor.data_type}, which cannot be "
                          "refitted")
    if tensor.data_type == 16:  # numpy has no bfloat16: keep the 16-bit patterns
        raw = tensor.raw_data or np.asarray(tensor.int32_data, np.uint16).tobytes()
        return np.frombuffer(raw, np.uint16).copy()
    return np.ascontiguousarray(numpy_helper.to_array(tensor).astype(np_type, copy=False)).reshape(-1)


def graph_weights(path: str | Path) -> GraphWeights:
    model = _load(Path(path))
    weights = {}
    for t in model.graph.initializer:
        weights[t.name] = (t.data_type, tuple(t.dims), hashlib.sha256(_raw(t).tobytes()).hexdigest())
    return GraphWeights(Path(path), tuple(n.op_type for n in model.graph.node), weights)


def refit_plan(old: GraphWeights | None, new: GraphWeights) -> RefitPlan:
    """The initializers to hand the refitter when going from `old` (the graph the engine holds; None when
    unknown: all of them) to `new`. EngineError when the graphs differ in structure: then only a rebuild helps."""
    if old is None:  # every float weight (integer initializers are shapes and indices, never weights)
        floats = tuple(sorted(n for n, (dtype, _, _) in new.weights.items() if dtype in _FLOAT_TYPES))
        return RefitPlan(floats, len(new.weights) - len(floats), exact=False)
    if old.structure != new.structure:
        raise EngineError(f"{new.path} has another structure than the graph the engine was built from "
                          f"({len(new.structure)} vs {len(old.structure)} nodes); the engine must be rebuilt")
    if set(old.weights) != set(new.weights):
        extra = sorted(set(new.weights) ^ set(old.weights))[:3]
        raise EngineError(f"{new.path}: its initializers differ from the engine's graph (e.g. {', '.join(extra)}); "
                          "the engine must be rebuilt")
    changed = []
    for name, (dtype, shape, digest) in new.weights.items():
        o_dtype, o_shape, o_digest = old.weights[name]
        if (dtype, shape) != (o_dtype, o_shape):
            raise EngineError(f"initializer {name!r} changed from {o_shape} (type {o_dtype}) to {shape} "
                              f"(type {dtype}); a refit keeps shapes and types: the engine must be rebuilt")
        if digest != o_digest:
            changed.append(name)
    return RefitPlan(tuple(sorted(changed)), len(new.weights) - len(changed))


def refit_engine(trt, engine, graph: Path, plan: RefitPlan, logger) -> int:
    """Set the planned weights (and any TensorRT asks for with them) from `graph`, then refit `engine` in
    place. Returns the number of weights set. Needs tensorrt and the engine's GPU."""
    if plan.empty:
        return 0
    model = _load(graph)
    arrays = {t.name: t for t in model.graph.initializer}
    refitter = trt.Refitter(engine, logger)
    keep = []  # TensorRT reads the host buffers at refit time: keep them alive until then

    def set_weight(name: str) -> None:
        if name not in arrays:
            raise EngineError(f"the engine asks for weight {name!r}, which {graph} does not have; rebuild the engine")
        values = _raw(arrays[name])
        keep.append(values)
        dtype = getattr(trt.DataType, _ONNX_TYPES[arrays[name].data_type][1])
        if not refitter.set_named_weights(name, trt.Weights(dtype, values.ctypes.data, values.size)):
            raise EngineError(f"TensorRT refused new values for weight {name!r}; rebuild the engine")

    refittable = set(refitter.get_all_weights())
    names = plan.changed if plan.exact else [n for n in plan.changed if n in refittable]
    lost = [n for n in names if n not in refittable]
    if lost:
        raise EngineError(f"the engine holds {', '.join(lost[:3])} in a form TensorRT cannot refit (folded into "
                          f"other layers); rebuild the engine")
    done = set()
    for name in names:
        set_weight(name)
        done.add(name)
    for name in refitter.get_missing_weights():  # weights TensorRT folded together with those set above
        if name not in done:
            set_weight(name)
            done.add(name)
    if not refitter.refit_cuda_engine():
        raise EngineError(f"TensorRT could not refit the engine from {graph}; rebuild it")
    return len(done)
