"""Samplers by name: the plan each one follows and the function that runs it."""
from __future__ import annotations

import numpy as np
import torch

from ..models.configs import ScheduleConfig
from .ddim import sample_ddim, sample_ddpm
from .k_samplers import sample_dpmpp_2m, sample_euler, sample_euler_ancestral
from .plan import Plan
from .plms import sample_plms
from .schedule import alphas_cumprod_for, check_steps, karras_sigmas, sigma_to_t, sigmas_of, spaced_timesteps

SAMPLERS = {
    "ddim": sample_ddim,
    "ddpm": sample_ddpm,
    "plms": sample_plms,
    "euler": sample_euler,
    "euler_a": sample_euler_ancestral,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_2m_karras": sample_dpmpp_2m,
}
STOCHASTIC = {"ddpm", "euler_a"}  # draw fresh noise every step (DDIM too when eta > 0)


def check_sampler(name: str) -> None:
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")


def make_plan(name: str, steps: int, cfg: ScheduleConfig) -> Plan:
    """The timesteps (and noise levels) sampler `name` visits in `steps` steps, as diffusers' matching
    scheduler lays them out for the same schedule config."""
    check_sampler(name)
    check_steps(steps, cfg)
    ac = alphas_cumprod_for(cfg)
    T = cfg.num_train_timesteps
    if name in ("ddim", "ddpm", "plms"):
        return Plan(spaced_timesteps(steps, cfg), ac, steps)
    sigmas_all = sigmas_of(ac)
    if name == "euler" or name == "euler_a":
        if cfg.timestep_spacing == "linspace":
            ts = np.linspace(0, T - 1, steps)[::-1].astype(np.float32)
        elif cfg.timestep_spacing == "leading":
            ts = (np.arange(0, steps) * (T // steps)).round()[::-1].astype(np.float32) + cfg.steps_offset
        else:
            ts = np.arange(T, 0, -T / steps).round().astype(np.float32) - 1
        sig = np.interp(ts, np.arange(T), sigmas_all)
        return Plan(ts.copy(), ac, steps, np.append(sig, 0.0).astype(np.float32), space="sigma",
                    init_sigma_leading=cfg.timestep_spacing == "leading")
    # DPM-Solver++: N + 1 points of the spacing, the last dropped (diffusers' DPMSolverMultistepScheduler)
    if name == "dpmpp_2m_karras":
        sig = karras_sigmas(sigmas_all[0], sigmas_all[-1], steps)
        log_sigmas = np.log(sigmas_all)
        ts = np.array([sigma_to_t(s, log_sigmas) for s in sig]).round()
    else:
        if cfg.timestep_spacing == "linspace":
            ts = np.linspace(0, T - 1, steps + 1).round()[::-1][:-1]
        elif cfg.timestep_spacing == "leading":
            ts = (np.arange(0, steps + 1) * (T // (steps + 1))).round()[::-1][:-1] + cfg.steps_offset
        else:
            ts = np.arange(T, 0, -T / steps).round() - 1
        sig = np.interp(ts, np.arange(T), sigmas_all)
    return Plan(ts.astype(np.int64).copy(), ac, steps, np.append(sig, 0.0).astype(np.float32))


def run_sampler(name: str, model, x: torch.Tensor, plan: Plan, prediction_type: str, eta: float = 0.0,
                generator: torch.Generator | None = None, callback=None, disable=None) -> torch.Tensor:
    """Run sampler `name` from latents x along `plan`; model(x, t) returns the (guided) model output."""
    check_sampler(name)
    kwargs = dict(prediction_type=prediction_type, callback=callback, disable=disable)
    if name == "ddim":
        kwargs.update(eta=eta, generator=generator)
    elif name in STOCHASTIC:
        kwargs.update(generator=generator)
    return SAMPLERS[name](model, x, plan, **kwargs)
