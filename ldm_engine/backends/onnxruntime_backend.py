"""The exported ONNX graphs run by ONNX Runtime: the CPU execution provider here (one thread per
physical core, one thread pool shared by every session), CUDA / TensorRT execution providers when
onnxruntime-gpu and a CUDA device are present (inputs then stay on the device through IO binding)."""
from __future__ import annotations

import numpy as np
import torch

from .graph_backend import GraphBackend, physical_cores

_GLOBAL_POOL: int | None = None  # threads of the process-wide pool, once it is made


def _ort():
    try:
        import onnxruntime
    except ImportError:
        raise RuntimeError("backend='onnxruntime' needs ONNX Runtime: pip install 'ldm_engine[onnx]'") from None
    return onnxruntime


def _shared_pool(ort, threads: int) -> bool:
    """Make ONNX Runtime's process-wide intra-op pool once; returns whether sessions can use it."""
    global _GLOBAL_POOL
    if _GLOBAL_POOL is None:
        try:
            ort.set_global_thread_pool_sizes(threads, 1)
            _GLOBAL_POOL = threads
        except Exception:  # an ONNX Runtime build without global pools
            _GLOBAL_POOL = 0
    return _GLOBAL_POOL > 0


def session_options(threads: int | None = None):
    """SessionOptions that work in this process: once the shared pool exists, ONNX Runtime refuses
    every session that asks for threads of its own, so sessions made beside an ldm_engine backend
    (parity checks, a user's own graphs) should start from these."""
    ort = _ort()
    so = ort.SessionOptions()
    if _GLOBAL_POOL:
        so.use_per_session_threads = False
    elif threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    return so


class OnnxRuntimeBackend(GraphBackend):
    name = "onnxruntime"

    def __init__(self, model, device="cpu", dtype: torch.dtype | None = None, threads: int | None = None,
                 shared_pool: bool = True, providers: list | None = None, onnx_dir=None, cache_dir=None,
                 progress: bool = True):
        if dtype not in (None, torch.float32):
            raise ValueError(f"backend='onnxruntime' runs the fp32 graphs (got dtype={dtype}); for bf16 on this CPU use "
                             "backend='openvino', or backend='tensorrt' for fp16 on a GPU")
        super().__init__(model, device, onnx_dir, cache_dir, progress)
        ort = _ort()
        self.ort = ort
        self.dtype = torch.float32
        self.threads = threads or physical_cores()
        available = ort.get_available_providers()
        if providers is None:
            if self.device.type == "cuda":
                if "CUDAExecutionProvider" not in available:
                    raise RuntimeError("device='cuda' needs onnxruntime-gpu (CUDAExecutionProvider); this ONNX "
                                       f"Runtime has {', '.join(available)}")
                providers = [p for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider") if p in available]
            else:
                providers = ["CPUExecutionProvider"]
        self.providers = providers
        # one pool of `threads` for every session (text encoder, UNet, VAE) instead of one pool each; it
        # is ONNX Runtime's process-wide pool, after which other sessions need session_options()
        self.shared_pool = (self.device.type == "cpu" and shared_pool and (_GLOBAL_POOL or threads is None)
                            and _shared_pool(ort, self.threads))
        self._sessions: dict[str, object] = {}

    def _session(self, component: str):
        if component not in self._sessions:
            from ..export.weight_overrides import add_to_session_options

            so = session_options(None if self.shared_pool else self.threads)
            so.graph_optimization_level = self.ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            so.execution_mode = self.ort.ExecutionMode.ORT_SEQUENTIAL
            path, arrays = self.graph_source(component)
            keep = add_to_session_options(so, arrays) if arrays else []  # alive as long as the session
            self._sessions[component] = (self.ort.InferenceSession(str(path), so, providers=self.providers), keep)
        return self._sessions[component][0]

    def _loaded_keys(self) -> list[str]:
        return list(self._sessions)

    def _forget(self, key: str) -> None:
        self._sessions.pop(key, None)

    def _run_all(self, component: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        session = self._session(component)
        if self.device.type != "cuda":
            return session.run(None, feeds)
        # IO binding: inputs are copied to the device once, the outputs are read back once
        binding = session.io_binding()
        for name, array in feeds.items():
            binding.bind_ortvalue_input(name, self.ort.OrtValue.ortvalue_from_numpy(array, "cuda", self.device.index or 0))
        for out in session.get_outputs():
            binding.bind_output(out.name, "cuda", self.device.index or 0)
        session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()
