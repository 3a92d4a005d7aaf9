"""Samplers by name: the plan each one follows and the function that runs it."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from ..models.configs import ScheduleConfig
from .ddim import sample_ddim, sample_ddpm
from .k_samplers import sample_dpmpp_2m, sample_euler, sample_euler_ancestral
from .lcm import consistency_timesteps, sample_lcm
from .plan import Plan
from .plms import sample_plms
from .schedule import alphas_cumprod_for, check_steps, karras_sigmas, sigma_to_t, sigmas_of, spaced_timesteps
from .tcd import DEFAULT_GAMMA, check_gamma, sample_tcd

SAMPLERS = {
    "ddim": sample_ddim,
    "ddpm": sample_ddpm,
    "plms": sample_plms,
    "euler": sample_euler,
    "euler_a": sample_euler_ancestral,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_2m_karras": sample_dpmpp_2m,
    "lcm": sample_lcm,
    "tcd": sample_tcd,
}
STOCHASTIC = {"ddpm", "euler_a", "lcm", "tcd"}  # draw fresh noise (DDIM too when eta > 0; TCD when gamma > 0)
# eta when the caller gives none: DDIM's eta 0 (deterministic), TCD's gamma 0.3 (diffusers' TCDScheduler)
DEFAULT_ETA = {"tcd": DEFAULT_GAMMA}
# The timestep spacing and offset of each sampler's diffusers scheduler, taken where a diffusers scheduler
# config leaves them unset (ScheduleConfig.explicit): what `NewScheduler.from_config(pipe.scheduler.config)`
# does when diffusers swaps that scheduler in. LCM and TCD lay out their own timesteps and use neither.
SPACING_DEFAULTS = {
    "ddim": ("leading", 0), "ddpm": ("leading", 0), "plms": ("leading", 0),  # DDIM / DDPM / PNDM schedulers
    "euler": ("linspace", 0), "euler_a": ("linspace", 0),  # (Ancestral)EulerDiscreteScheduler
    "dpmpp_2m": ("linspace", 0), "dpmpp_2m_karras": ("linspace", 0),  # DPMSolverMultistepScheduler
    "lcm": ("leading", 0), "tcd": ("leading", 0),  # LCMScheduler, TCDScheduler
}


def check_sampler(name: str) -> None:
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")


def sampler_eta(name: str, eta: float | None) -> float:
    """The eta sampler `name` runs with: the given one, else its default (TCD: gamma 0.3; others 0)."""
    eta = DEFAULT_ETA.get(name, 0.0) if eta is None else float(eta)
    if name == "tcd":
        check_gamma(eta)
    elif eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    return eta


def schedule_for(name: str, cfg: ScheduleConfig) -> ScheduleConfig:
    """`cfg` with the fields its source left unset (cfg.explicit) at sampler `name`'s own defaults."""
    if cfg.explicit is None:
        return cfg
    spacing, offset = SPACING_DEFAULTS[name]
    changes = {k: v for k, v in (("timestep_spacing", spacing), ("steps_offset", offset)) if k not in cfg.explicit}
    return replace(cfg, **changes) if changes else cfg


def make_plan(name: str, steps: int, cfg: ScheduleConfig) -> Plan:
    """The timesteps (and noise levels) sampler `name` visits in `steps` steps, as diffusers' matching
    scheduler lays them out for the same schedule config (see schedule_for for unset fields)."""
    check_sampler(name)
    check_steps(steps, cfg)
    cfg = schedule_for(name, cfg)
    ac = alphas_cumprod_for(cfg)
    T = cfg.num_train_timesteps
    if name in ("lcm", "tcd"):
        return Plan(consistency_timesteps(steps, cfg), ac, steps, timestep_scaling=cfg.timestep_scaling)
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


def run_sampler(name: str, model, x: torch.Tensor, plan: Plan, prediction_type: str, eta: float | None = None,
                generator: torch.Generator | None = None, callback=None, disable=None) -> torch.Tensor:
    """Run sampler `name` from latents x along `plan`; model(x, t) returns the (guided) model output.
    `eta`: DDIM's eta or TCD's gamma; None takes the sampler's default (sampler_eta)."""
    check_sampler(name)
    kwargs = dict(prediction_type=prediction_type, callback=callback, disable=disable)
    if name in ("ddim", "tcd"):
        kwargs.update(eta=sampler_eta(name, eta), generator=generator)
    elif name in STOCHASTIC:
        kwargs.update(generator=generator)
    return SAMPLERS[name](model, x, plan, **kwargs)
