"""Noise schedules and samplers as small pure functions (k-diffusion style)."""
from .plan import Plan
from .samplers import SAMPLERS, check_sampler, make_plan, run_sampler, sampler_eta, schedule_for
from .schedule import alphas_cumprod_for, betas_for

__all__ = ["Plan", "SAMPLERS", "check_sampler", "make_plan", "run_sampler", "sampler_eta", "schedule_for",
           "alphas_cumprod_for", "betas_for"]
