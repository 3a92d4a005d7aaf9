"""Strategic stochastic sampling of Trajectory Consistency Distillation (Zheng et al. 2024, "Trajectory
Consistency Distillation: Improved Latent Consistency Distillation by Semi-Linear Consistency Function
with Trajectory Mapping"), as diffusers' TCDScheduler lays it out.

Each step maps the model's (x0, eps) estimate to an intermediate timestep s below the next one, then
forward-diffuses from s to the next timestep with fresh noise; gamma sets how far below:

    s      = floor((1 - gamma) t_next)                      (t_next = 0 after the last step)
    x_s    = sqrt(abar_s) x0 + sqrt(1 - abar_s) eps
    x_next = sqrt(abar_next / abar_s) x_s + sqrt(1 - abar_next / abar_s) z   (gamma > 0, not the last step)

gamma = 0 is deterministic (DDIM on the consistency timesteps); gamma = 1 is LCM-like multistep
sampling. The timesteps are those of LCM (lcm.consistency_timesteps).
"""
from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from .ddim import _noise
from .plan import Plan, after_step
from .prediction import to_x0_eps

DEFAULT_GAMMA = 0.3  # diffusers' TCDScheduler.step default (and the paper's recommendation)


def check_gamma(gamma: float) -> None:
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"TCD's gamma (eta=) must be in [0, 1], got {gamma}; 0.3 is the usual choice")


def intermediate_timestep(t_next: int, gamma: float) -> int:
    """s = floor((1 - gamma) t_next), rounded in float32 as diffusers computes it (the floor is
    sensitive to that rounding where (1 - gamma) t_next is near an integer)."""
    return int(torch.floor((1 - gamma) * torch.tensor(t_next, dtype=torch.int64)))


def tcd_targets(plan: Plan) -> list[int]:
    """Each step's next timestep; 0 after the last."""
    ts = [int(t) for t in plan.timesteps]
    return ts[1:] + [0]


@torch.no_grad()
def sample_tcd(model, x, plan: Plan, prediction_type: str = "eps", eta: float = DEFAULT_GAMMA, generator=None,
               callback=None, disable=None, **_):
    """TCD's strategic stochastic sampling (Zheng et al. 2024); `eta` is the paper's gamma."""
    check_gamma(eta)
    ts, targets = [int(t) for t in plan.timesteps], tcd_targets(plan)
    for i, t in enumerate(tqdm(ts, disable=disable, desc="tcd")):
        t_next = targets[i]
        a, a_next, a_s = plan.abar(t), plan.abar(t_next), plan.abar(intermediate_timestep(t_next, eta))
        x0, eps = to_x0_eps(model(x, t), x, a, prediction_type)
        x_s = math.sqrt(a_s) * x0 + math.sqrt(1.0 - a_s) * eps
        if eta > 0 and i + 1 < len(ts):
            r = a_next / a_s
            x = math.sqrt(r) * x_s + math.sqrt(1.0 - r) * _noise(x_s, generator)
        else:
            x = x_s
        x = after_step(callback, {"i": i, "t": t, "x": x, "denoised": x0}, x)
    return x
