"""The sampling loop as one CUDA graph per shape bucket.

[select timestep -> (scale input) -> denoiser -> fused guidance + update -> advance step] is captured
once per (sampler, latent shape, steps, guided, prediction) bucket and replayed once per step. The
per-step coefficients, the timesteps and the guidance scale live in device buffers indexed by a device
step counter, and the per-call inputs (context, concatenated channels, extra UNet inputs) are copied
into buffers the bucket owns, so a new seed, prompt or guidance scale reuses the graph; every tensor the
graph reads or writes is owned by its bucket and stays alive with it. On a GPU this removes per-step kernel-launch and
Python overhead from the critical path.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..info import native_extension
from .native import draws_noise, native_name, plan_arrays
from .noise import randn
from .plan import Plan
from .samplers import sampler_eta

SAMPLER_IDS = {"ddim": 0, "euler": 1, "euler_a": 2, "dpmpp_2m": 3, "dpmpp_2m_karras": 3, "lcm": 4, "tcd": 5}
PREDICTION_IDS = {"eps": 0, "v": 1}


def bucket_key(sampler: str, shape: tuple, steps: int, guided: bool, prediction: str) -> tuple:
    """Graphs are specialized to everything that changes kernel shapes or control flow."""
    if sampler not in SAMPLER_IDS:
        raise ValueError(f"CUDA graphs support {', '.join(SAMPLER_IDS)}; got {sampler!r}")
    if prediction not in PREDICTION_IDS:
        raise ValueError(f"CUDA graphs support eps and v prediction, got {prediction!r}")
    return (SAMPLER_IDS[sampler], tuple(int(s) for s in shape), int(steps), bool(guided), PREDICTION_IDS[prediction])


def step_table(sampler: str, plan: Plan, eta: float | None = None) -> np.ndarray:
    """(steps, 16) float32 per-step coefficients (the native StepCoef layout), uploaded once per run."""
    ext = native_extension()
    if ext is None:
        raise RuntimeError("the native extension ldm_engine._C is not built")
    eta = sampler_eta(native_name(sampler), eta)
    return np.asarray(ext.step_table(native_name(sampler), eta=eta, **plan_arrays(sampler, plan, eta)))


def input_signature(inputs: dict[str, torch.Tensor | None]) -> tuple:
    """The per-call inputs' names, shapes and dtypes: a graph is captured per signature (a 154-token
    context or an extra input channel changes kernel shapes)."""
    return tuple((k, None if v is None else (tuple(v.shape), str(v.dtype))) for k, v in sorted(inputs.items()))


@dataclass
class _Bucket:
    graph: object
    tensors: dict = field(default_factory=dict)  # every buffer the graph touches, kept alive here


class CudaGraphLoop:
    """Runs sampling loops on CUDA by replaying captured graphs (see the module docstring)."""

    def __init__(self):
        ext = native_extension()
        if ext is None or not hasattr(ext, "cuda"):
            raise RuntimeError("ldm_engine._C was built without CUDA (no CUDA toolkit at build time); "
                               "reinstall on a machine with nvcc, or use scheduler='python'")
        if not torch.cuda.is_available():
            raise RuntimeError("CUDA graphs need a CUDA device; none is available")
        self._ext = ext
        self._buckets: dict[tuple, _Bucket] = {}

    def run(self, sampler: str, raw_model, x: torch.Tensor, plan: Plan, prediction: str, guided: bool,
            guidance: float, eta: float | None = None, generator: torch.Generator | None = None,
            inputs: dict[str, torch.Tensor | None] | None = None) -> torch.Tensor:
        """`raw_model(x, t, inputs)` reads every per-call tensor (context, concatenated channels, extra
        UNet inputs) from `inputs`: the graph is captured on buffers of its own, and each run copies this
        call's values into them, so a new prompt reuses the graph instead of replaying the old one's."""
        inputs = dict(inputs or {})
        steps = len(plan.timesteps)
        key = bucket_key(sampler, x.shape, steps, guided, prediction) + input_signature(inputs)
        bucket = self._buckets.get(key) or self._capture(key, sampler, raw_model, x, steps, guided, prediction, inputs)
        t = bucket.tensors
        for name, value in inputs.items():
            if value is not None:
                t["inputs"][name].copy_(value)
        t["table"].copy_(torch.from_numpy(step_table(sampler, plan, eta)))
        t["timesteps"].copy_(torch.tensor([float(v) for v in plan.timesteps]))
        t["guidance"].fill_(float(guidance))
        t["x"].copy_(x)
        t["prev"].zero_()
        t["step"].zero_()
        for i in range(steps):
            if draws_noise(sampler, i, steps, eta):  # the noise a step adds, drawn in the reference's order
                t["noise"].copy_(randn(x.shape, generator))
            bucket.graph.replay()
        return t["x"].clone()

    def _capture(self, key, sampler, raw_model, x, steps, guided, prediction, inputs) -> _Bucket:
        ext, dev = self._ext, x.device
        n = x.numel()
        t = {
            "inputs": {k: None if v is None else torch.empty_like(v, device=dev) for k, v in inputs.items()},
            "x": torch.zeros_like(x, dtype=torch.float32), "xin": torch.zeros_like(x, dtype=torch.float32),
            "prev": torch.zeros_like(x, dtype=torch.float32), "noise": torch.zeros_like(x, dtype=torch.float32),
            "table": torch.zeros(steps, 16, device=dev), "timesteps": torch.zeros(steps, device=dev),
            "t": torch.zeros(1, device=dev), "in_scale": torch.ones(1, device=dev),
            "guidance": torch.ones(1, device=dev), "step": torch.zeros(1, dtype=torch.int32, device=dev),
        }
        sigma_space = sampler in ("euler", "euler_a")

        def one_step():
            stream = torch.cuda.current_stream().cuda_stream
            ext.cuda.select_step(t["timesteps"].data_ptr(), t["step"].data_ptr(), t["t"].data_ptr(),
                                 t["table"].data_ptr(), t["in_scale"].data_ptr(), stream)
            if sigma_space:
                ext.cuda.scale_input(t["x"].data_ptr(), t["xin"].data_ptr(), t["in_scale"].data_ptr(), n, stream)
            out = raw_model(t["xin"] if sigma_space else t["x"], t["t"][0], t["inputs"]).float().contiguous()
            t["out"] = out  # the graph's output buffer: keep it alive
            ext.cuda.fused_update(key[0], key[4], t["table"].data_ptr(), t["step"].data_ptr(), t["x"].data_ptr(),
                                  t["prev"].data_ptr(), out.data_ptr(), guided, t["guidance"].data_ptr(),
                                  t["noise"].data_ptr(), n, stream)
            ext.cuda.advance(t["step"].data_ptr(), stream)

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the capture, as torch requires
            one_step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            one_step()
        self._buckets[key] = bucket = _Bucket(graph, t)
        return bucket
