"""Discrete-time samplers on alpha-bar: DDIM and DDPM ancestral sampling."""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .noise import Generators, randn
from .plan import Plan, after_step
from .prediction import to_x0_eps


def _noise(x: torch.Tensor, generator: Generators) -> torch.Tensor:
    return randn(x.shape, generator, x.dtype, x.device)


@torch.no_grad()
def sample_ddim(model, x, plan: Plan, prediction_type: str = "eps", eta: float = 0.0, generator=None,
                callback=None, disable=None):
    """DDIM (Song et al. 2021, "Denoising Diffusion Implicit Models"); eta = 0 is deterministic."""
    for i, t in enumerate(tqdm(plan.timesteps, disable=disable, desc="ddim")):
        t = int(t)
        a, a_prev = plan.abar(t), plan.abar(t - plan.step_stride)
        x0, eps = to_x0_eps(model(x, t), x, a, prediction_type)
        std = eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)) ** 0.5
        x = a_prev ** 0.5 * x0 + (1 - a_prev - std ** 2) ** 0.5 * eps
        if eta > 0:
            x = x + std * _noise(x, generator)
        x = after_step(callback, {"i": i, "t": t, "x": x, "denoised": x0}, x)
    return x


@torch.no_grad()
def sample_ddpm(model, x, plan: Plan, prediction_type: str = "eps", generator=None, callback=None, disable=None):
    """DDPM ancestral sampling (Ho et al. 2020, "Denoising Diffusion Probabilistic Models"), posterior
    variance beta-tilde ("fixed small"), from each listed timestep to the next."""
    ts = [int(t) for t in plan.timesteps]
    for i, t in enumerate(tqdm(ts, disable=disable, desc="ddpm")):
        prev = ts[i + 1] if i + 1 < len(ts) else -1
        a = plan.abar(t)
        a_prev = plan.abar(prev) if prev >= 0 else 1.0
        alpha = a / a_prev
        x0, _ = to_x0_eps(model(x, t), x, a, prediction_type)
        mean = (a_prev ** 0.5 * (1 - alpha) / (1 - a)) * x0 + (alpha ** 0.5 * (1 - a_prev) / (1 - a)) * x
        if t > 0:
            var = max((1 - a_prev) / (1 - a) * (1 - alpha), 1e-20)
            mean = mean + var ** 0.5 * _noise(x, generator)
        x = mean
        x = after_step(callback, {"i": i, "t": t, "x": x, "denoised": x0}, x)
    return x
