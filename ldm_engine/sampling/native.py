"""The sampling loop run by the native extension (`ldm_engine._C.run_loop`): the denoiser is called once
per step with the CFG batch; guidance and the sampler update happen in C++ in one pass, mirroring the
Python samplers operation by operation."""
from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from ..info import native_extension
from .noise import randn
from .plan import Plan
from .samplers import sampler_eta
from .tcd import intermediate_timestep, tcd_targets

NATIVE_SAMPLERS = ("ddim", "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras", "lcm", "tcd")
DISCRETE = ("ddim", "lcm", "tcd")  # samplers on integer timesteps and alpha-bars (the others on sigmas)


def native_name(sampler: str) -> str:
    """The native loop's sampler: Karras sigmas arrive in the plan, the solver is the same."""
    return "dpmpp_2m" if sampler == "dpmpp_2m_karras" else sampler


def plan_arrays(sampler: str, plan: Plan, eta: float | None = None) -> dict:
    """The plan as the native loop consumes it: timesteps, and the alpha-bars of the discrete samplers
    (at each timestep and at its target) or the noise levels; TCD's intermediate alpha-bars (they
    depend on gamma, `eta`) and LCM's timestep scaling."""
    name = native_name(sampler)
    ts = [int(t) for t in plan.timesteps]
    arrays = {"timesteps": [float(t) for t in plan.timesteps], "abar": [], "abar_prev": [], "sigmas": [], "abar_s": [],
              "timestep_scaling": float(plan.timestep_scaling)}
    if name not in DISCRETE:
        arrays["sigmas"] = [float(s) for s in plan.sigmas]
        return arrays
    arrays["abar"] = [plan.abar(t) for t in ts]
    if name == "ddim":
        targets = [t - plan.step_stride for t in ts]
    elif name == "lcm":
        targets = ts[1:] + ts[-1:]  # the last step returns its consistency estimate: no target
    else:
        targets = tcd_targets(plan)
        gamma = sampler_eta("tcd", eta)
        arrays["abar_s"] = [plan.abar(intermediate_timestep(t, gamma)) for t in targets]
    arrays["abar_prev"] = [plan.abar(t) for t in targets]
    return arrays


def draws_noise(sampler: str, i: int, steps: int, eta: float | None = None) -> bool:
    """Whether step i of `steps` draws fresh noise (the Python samplers' order; the C++ loop's draws_noise)."""
    name, last = native_name(sampler), i + 1 == steps
    if name == "euler_a":
        return True
    if name in ("ddim", "tcd"):
        return sampler_eta(name, eta) > 0 and (name == "ddim" or not last)
    return name == "lcm" and not last


def available(sampler: str) -> bool:
    return native_extension() is not None and sampler in NATIVE_SAMPLERS


def run_native(sampler: str, raw_model, x: torch.Tensor, plan: Plan, prediction_type: str, guided: bool,
               guidance: float, eta: float | None = None, generator=None, disable: bool | None = None,
               progress_callback=None) -> torch.Tensor:
    """raw_model(x_in, t) -> the UNet's raw output for the CFG batch [uncond; cond] (or the plain batch
    when not guided); returns the final latents. `eta`: DDIM's eta or TCD's gamma (None: the default).
    `generator`: one, or a list with one per sample (see sampling.noise). `progress_callback(done, total)`
    runs after each model call; an exception it raises stops the loop and propagates."""
    ext = native_extension()
    if ext is None:
        raise RuntimeError("the native extension ldm_engine._C is not built; reinstall ldm_engine or use "
                           "scheduler='python'")
    if x.device.type != "cpu" or x.dtype != torch.float32:
        raise ValueError(f"the native CPU loop runs float32 CPU latents, got {x.dtype} on {x.device}")
    name = native_name(sampler)
    discrete = name in DISCRETE
    eta = sampler_eta(name, eta)
    arrays = plan_arrays(sampler, plan, eta)
    bar = tqdm(total=len(plan.timesteps), disable=disable, desc=f"{sampler} (native)")

    def denoiser(step: int, t: float, x_in: np.ndarray) -> np.ndarray:
        out = raw_model(torch.from_numpy(x_in), int(t) if discrete else t)
        bar.update()
        if progress_callback is not None:  # the step count from the C++ loop (a disabled bar counts nothing)
            progress_callback(step + 1, len(plan.timesteps))
        return out.detach().float().contiguous().numpy()

    def noise() -> np.ndarray:
        return randn(x.shape, generator).numpy()

    try:
        out = ext.run_loop(x.contiguous().numpy(), name, prediction_type, guided=guided, guidance=float(guidance),
                           eta=float(eta), denoiser=denoiser, noise=noise, **arrays)
    finally:
        bar.close()
    return torch.from_numpy(out)
