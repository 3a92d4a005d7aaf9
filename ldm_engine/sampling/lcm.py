"""Multistep latent consistency sampling (Luo et al. 2023, "Latent Consistency Models: Synthesizing
High-Resolution Images with Few-Step Inference"), as diffusers' LCMScheduler lays it out.

The model's x0 estimate is mixed with the current latents by the consistency boundary condition
(Song et al. 2023, "Consistency Models"), then noised afresh to the next timestep:

    denoised = c_skip(t) x_t + c_out(t) x0(x_t, t)
    x_next   = sqrt(abar_next) denoised + sqrt(1 - abar_next) z        (z ~ N(0, I); none after the last step)

with c_skip = sd^2 / ((k t)^2 + sd^2), c_out = k t / sqrt((k t)^2 + sd^2), sd = 0.5 and k the
timestep scaling (10). The timesteps are taken, evenly by index, from the `original_inference_steps`
schedule the model was distilled on (t = T/N_orig * i - 1), which is why LCM ignores the timestep
spacing of the other samplers.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from tqdm.auto import tqdm

from ..models.configs import ScheduleConfig
from .ddim import _noise
from .plan import Plan, after_step
from .prediction import to_x0_eps

SIGMA_DATA = 0.5


def consistency_timesteps(steps: int, cfg: ScheduleConfig) -> np.ndarray:
    """(steps,) int64 timesteps, descending: every (N_orig / steps)-th of the N_orig-step distillation
    schedule T/N_orig * (1..N_orig) - 1, starting from its last (LCM and TCD)."""
    T, orig = cfg.num_train_timesteps, cfg.original_inference_steps
    if not 1 <= orig <= T:
        raise ValueError(f"original_inference_steps must be in [1, {T}] (the training timesteps), got {orig}")
    if steps > orig:
        raise ValueError(f"LCM and TCD take at most original_inference_steps ({orig}) steps, got {steps}; "
                         f"use 1-8 steps (the timesteps are a subset of the {orig}-step distillation schedule)")
    origin = (np.arange(1, orig + 1) * (T // orig) - 1)[::-1]
    index = np.floor(np.linspace(0, orig, num=steps, endpoint=False)).astype(np.int64)
    return origin[index].astype(np.int64).copy()


def boundary_scalings(t: int, timestep_scaling: float) -> tuple[float, float]:
    """(c_skip, c_out) of the consistency boundary condition at discrete timestep t."""
    st = t * timestep_scaling
    denom = st * st + SIGMA_DATA * SIGMA_DATA
    return SIGMA_DATA * SIGMA_DATA / denom, st / math.sqrt(denom)


@torch.no_grad()
def sample_lcm(model, x, plan: Plan, prediction_type: str = "eps", generator=None, callback=None, disable=None, **_):
    """Multistep latent consistency sampling (Luo et al. 2023): a consistency estimate of x0 per step,
    fresh noise to the next timestep between steps."""
    ts = [int(t) for t in plan.timesteps]
    for i, t in enumerate(tqdm(ts, disable=disable, desc="lcm")):
        x0, _ = to_x0_eps(model(x, t), x, plan.abar(t), prediction_type)
        c_skip, c_out = boundary_scalings(t, plan.timestep_scaling)
        denoised = c_skip * x + c_out * x0
        if i + 1 < len(ts):
            a_next = plan.abar(ts[i + 1])
            x = math.sqrt(a_next) * denoised + math.sqrt(1.0 - a_next) * _noise(denoised, generator)
        else:
            x = denoised
        x = after_step(callback, {"i": i, "t": t, "x": x, "denoised": denoised}, x)
    return x
