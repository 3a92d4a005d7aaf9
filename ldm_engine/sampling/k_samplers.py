"""Samplers in sigma space, x = x0 + sigma * eps (Karras et al. 2022, "Elucidating the Design Space of
Diffusion-Based Generative Models"); the model sees x / sqrt(sigma^2 + 1) at its discrete timestep."""
from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from .ddim import _noise
from .plan import Plan, after_step
from .prediction import to_denoised, to_x0_eps


def _denoise(model, x, plan: Plan, i: int, prediction_type: str):
    sigma = float(plan.sigmas[i])
    return to_denoised(model(x / (sigma ** 2 + 1) ** 0.5, float(plan.timesteps[i])), x, sigma, prediction_type)


@torch.no_grad()
def sample_euler(model, x, plan: Plan, prediction_type: str = "eps", callback=None, disable=None, **_):
    """Euler method on the probability-flow ODE (Karras et al. 2022, Algorithm 2 without churn)."""
    for i in tqdm(range(len(plan.timesteps)), disable=disable, desc="euler"):
        denoised = _denoise(model, x, plan, i, prediction_type)
        sigma, sigma_next = float(plan.sigmas[i]), float(plan.sigmas[i + 1])
        x = x + (x - denoised) / sigma * (sigma_next - sigma)
        x = after_step(callback, {"i": i, "t": plan.timesteps[i], "x": x, "denoised": denoised}, x)
    return x


@torch.no_grad()
def sample_euler_ancestral(model, x, plan: Plan, prediction_type: str = "eps", generator=None, callback=None,
                           disable=None, **_):
    """Ancestral Euler: an Euler step down to sigma_down, then fresh noise up to sigma_next
    (Karras et al. 2022; the k-diffusion "euler_a" sampler)."""
    for i in tqdm(range(len(plan.timesteps)), disable=disable, desc="euler_a"):
        denoised = _denoise(model, x, plan, i, prediction_type)
        sigma, sigma_next = float(plan.sigmas[i]), float(plan.sigmas[i + 1])
        sigma_up = (sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2) ** 0.5
        sigma_down = (sigma_next ** 2 - sigma_up ** 2) ** 0.5
        x = x + (x - denoised) / sigma * (sigma_down - sigma)
        x = x + _noise(x, generator) * sigma_up
        x = after_step(callback, {"i": i, "t": plan.timesteps[i], "x": x, "denoised": denoised}, x)
    return x


def _lambda(sigma: float) -> float:
    """log(alpha_t / sigma_t) of the VP process at noise level sigma."""
    return -math.log(sigma) if sigma > 0 else math.inf


@torch.no_grad()
def sample_dpmpp_2m(model, x, plan: Plan, prediction_type: str = "eps", callback=None, disable=None, **_):
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
    Probabilistic Models"): multistep, second order with the midpoint correction, first order on the
    first step and on the last (to sigma = 0). Latents are VP (x_t = alpha_t x0 + sigma_t eps)."""
    n, prev_denoised = len(plan.timesteps), None
    for i in tqdm(range(n), disable=disable, desc="dpmpp_2m"):
        sigma, sigma_next = float(plan.sigmas[i]), float(plan.sigmas[i + 1])
        a_s, a_t = 1 / (sigma ** 2 + 1) ** 0.5, 1 / (sigma_next ** 2 + 1) ** 0.5
        denoised, _ = to_x0_eps(model(x, float(plan.timesteps[i])), x, a_s ** 2, prediction_type)
        h = _lambda(sigma_next) - _lambda(sigma)
        phi = -math.expm1(-h) if math.isfinite(h) else 1.0  # 1 - exp(-h)
        d = denoised
        if prev_denoised is not None and i < n - 1:
            r = (_lambda(sigma) - _lambda(float(plan.sigmas[i - 1]))) / h
            d = denoised + (denoised - prev_denoised) / (2 * r)
        x = (sigma_next * a_t / (sigma * a_s)) * x + a_t * phi * d
        prev_denoised = denoised
        x = after_step(callback, {"i": i, "t": plan.timesteps[i], "x": x, "denoised": denoised}, x)
    return x
