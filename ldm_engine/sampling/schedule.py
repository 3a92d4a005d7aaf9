"""Noise schedules and timestep spacings (DDPM, Ho et al. 2020; spacings of Lin et al. 2023, Table 2).

alphas_cumprod is computed in float32, as the training code and diffusers do, so that schedules agree
bit for bit; step coefficients are then taken in float64.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..models.configs import ScheduleConfig


def betas_for(cfg: ScheduleConfig) -> torch.Tensor:
    T = cfg.num_train_timesteps
    if cfg.beta_schedule == "scaled_linear":  # "linear" in the original LDM code: linear in sqrt(beta)
        return torch.linspace(cfg.beta_start ** 0.5, cfg.beta_end ** 0.5, T, dtype=torch.float32) ** 2
    if cfg.beta_schedule == "linear":
        return torch.linspace(cfg.beta_start, cfg.beta_end, T, dtype=torch.float32)
    if cfg.beta_schedule in ("cosine", "squaredcos_cap_v2"):  # Nichol & Dhariwal 2021
        f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        return torch.tensor([min(1 - f((i + 1) / T) / f(i / T), 0.999) for i in range(T)], dtype=torch.float32)
    raise ValueError(f"unknown beta schedule {cfg.beta_schedule!r}; use scaled_linear, linear or cosine")


def alphas_cumprod_for(cfg: ScheduleConfig) -> torch.Tensor:
    """(T,) float32 cumulative product of (1 - beta)."""
    return torch.cumprod(1.0 - betas_for(cfg), dim=0)


def spaced_timesteps(steps: int, cfg: ScheduleConfig) -> np.ndarray:
    """Integer timesteps, descending, for the discrete-time samplers (DDIM, DDPM, PLMS)."""
    T = cfg.num_train_timesteps
    if cfg.timestep_spacing == "leading":
        ts = (np.arange(0, steps) * (T // steps)).round()[::-1] + cfg.steps_offset
    elif cfg.timestep_spacing == "trailing":
        ts = np.round(np.arange(T, 0, -T / steps)) - 1
    elif cfg.timestep_spacing == "linspace":
        ts = np.linspace(0, T - 1, steps).round()[::-1]
    else:
        raise ValueError(f"unknown timestep spacing {cfg.timestep_spacing!r}; use leading, trailing or linspace")
    return ts.astype(np.int64).copy()


def check_steps(steps: int, cfg: ScheduleConfig) -> None:
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"num_inference_steps must be an integer >= 1, got {steps!r}")
    if steps > cfg.num_train_timesteps:
        raise ValueError(f"num_inference_steps ({steps}) cannot exceed the {cfg.num_train_timesteps} training timesteps")


def sigmas_of(alphas_cumprod: torch.Tensor) -> np.ndarray:
    """sigma(t) = sqrt((1 - abar) / abar): the noise level of x_t / sqrt(abar) (Karras et al. 2022)."""
    ac = alphas_cumprod.numpy().astype(np.float64)
    return ((1 - ac) / ac) ** 0.5


def sigma_to_t(sigma: float, log_sigmas: np.ndarray) -> float:
    """Continuous timestep of a noise level, interpolating log-sigma between neighbouring timesteps."""
    log_sigma = np.log(max(sigma, 1e-10))
    dists = log_sigma - log_sigmas
    low = int(np.clip(np.cumsum(dists >= 0).argmax(), 0, len(log_sigmas) - 2))
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]), 0, 1)
    return (1 - w) * low + w * (low + 1)


def karras_sigmas(sigma_min: float, sigma_max: float, steps: int, rho: float = 7.0) -> np.ndarray:
    """Noise levels evenly spaced in sigma^(1/rho) (Karras et al. 2022, eq. 5)."""
    ramp = np.linspace(0, 1, steps)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho
