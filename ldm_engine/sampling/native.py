"""The sampling loop run by the native extension (`ldm_engine._C.run_loop`): the denoiser is called once
per step with the CFG batch; guidance and the sampler update happen in C++ in one pass, mirroring the
Python samplers operation by operation."""
from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from ..info import native_extension
from .plan import Plan

NATIVE_SAMPLERS = ("ddim", "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras")


def native_name(sampler: str) -> str:
    """The native loop's sampler: Karras sigmas arrive in the plan, the solver is the same."""
    return "dpmpp_2m" if sampler == "dpmpp_2m_karras" else sampler


def plan_arrays(sampler: str, plan: Plan) -> dict:
    """The plan as the native loop consumes it: timesteps, and DDIM's alpha-bars or the noise levels."""
    discrete = native_name(sampler) == "ddim"
    ts = plan.timesteps
    return {
        "timesteps": [float(t) for t in ts],
        "abar": [plan.abar(int(t)) for t in ts] if discrete else [],
        "abar_prev": [plan.abar(int(t) - plan.step_stride) for t in ts] if discrete else [],
        "sigmas": [] if discrete else [float(s) for s in plan.sigmas],
    }


def available(sampler: str) -> bool:
    return native_extension() is not None and sampler in NATIVE_SAMPLERS


def run_native(sampler: str, raw_model, x: torch.Tensor, plan: Plan, prediction_type: str, guided: bool,
               guidance: float, eta: float = 0.0, generator: torch.Generator | None = None,
               disable: bool | None = None) -> torch.Tensor:
    """raw_model(x_in, t) -> the UNet's raw output for the CFG batch [uncond; cond] (or the plain batch
    when not guided); returns the final latents."""
    ext = native_extension()
    if ext is None:
        raise RuntimeError("the native extension ldm_engine._C is not built; reinstall ldm_engine or use "
                           "scheduler='python'")
    if x.device.type != "cpu" or x.dtype != torch.float32:
        raise ValueError(f"the native CPU loop runs float32 CPU latents, got {x.dtype} on {x.device}")
    name = native_name(sampler)
    discrete = name == "ddim"
    arrays = plan_arrays(sampler, plan)
    bar = tqdm(total=len(plan.timesteps), disable=disable, desc=f"{sampler} (native)")

    def denoiser(step: int, t: float, x_in: np.ndarray) -> np.ndarray:
        out = raw_model(torch.from_numpy(x_in), int(t) if discrete else t)
        bar.update()
        return out.detach().float().contiguous().numpy()

    def noise() -> np.ndarray:
        return torch.randn(x.shape, generator=generator, dtype=torch.float32).numpy()

    try:
        out = ext.run_loop(x.contiguous().numpy(), name, prediction_type, guided=guided, guidance=float(guidance),
                           eta=float(eta), denoiser=denoiser, noise=noise, **arrays)
    finally:
        bar.close()
    return torch.from_numpy(out)
