"""PLMS: pseudo linear multi-step sampling (Liu et al. 2022, "Pseudo Numerical Methods for Diffusion
Models on Manifolds"), as in the LDM code: the first step is a 2-evaluation improved Euler step, then
Adams-Bashforth combinations of up to four past eps predictions."""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .plan import Plan, after_step


def _transfer(x, eps, a, a_prev):
    """The pseudo-numerical transfer x_t -> x_prev of the DDIM family, given eps."""
    denom = a * (1 - a_prev) ** 0.5 + (a * (1 - a) * a_prev) ** 0.5
    return (a_prev / a) ** 0.5 * x - (a_prev - a) * eps / denom


def _as_eps(out, x, a, prediction_type):
    if prediction_type == "eps":
        return out
    if prediction_type == "v":
        return a ** 0.5 * out + (1 - a) ** 0.5 * x
    raise ValueError(f"PLMS supports eps and v prediction, got {prediction_type!r}")


@torch.no_grad()
def sample_plms(model, x, plan: Plan, prediction_type: str = "eps", callback=None, disable=None, **_):
    # Past raw model outputs are combined first and converted to eps at the current (x, t), and the first
    # step's second evaluation happens at the next listed timestep, as diffusers' PNDMScheduler does
    # (the same as converting each output for eps models, and as stepping t -> t - stride for uniform
    # spacings).
    stride, ts, outs = plan.step_stride, [int(t) for t in plan.timesteps], []
    for i in tqdm(range(len(ts)), disable=disable, desc="plms"):
        t = ts[i]
        a, a_prev = plan.abar(t), plan.abar(t - stride)
        out = model(x, t)
        outs.append(out)
        if i == 0:
            # Improved Euler: step ahead, evaluate there, restart from x with the averaged output.
            x_pred = _transfer(x, _as_eps(out, x, a, prediction_type), a, a_prev)
            if len(ts) == 1:
                x = x_pred
            else:
                t1 = ts[1]
                combined = (out + model(x_pred, t1)) / 2
                a_from, a_to = plan.abar(t1 + stride), plan.abar(t1)
                x = _transfer(x, _as_eps(combined, x, a_from, prediction_type), a_from, a_to)
        else:
            e = outs[-4:]
            if len(e) == 2:
                combined = (3 * e[-1] - e[-2]) / 2
            elif len(e) == 3:
                combined = (23 * e[-1] - 16 * e[-2] + 5 * e[-3]) / 12
            else:
                combined = (55 * e[-1] - 59 * e[-2] + 37 * e[-3] - 9 * e[-4]) / 24
            x = _transfer(x, _as_eps(combined, x, a, prediction_type), a, a_prev)
        x = after_step(callback, {"i": i, "t": t, "x": x}, x)
    return x
