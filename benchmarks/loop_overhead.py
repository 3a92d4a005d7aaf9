"""The sampling loop's own cost per step, Python samplers vs the native C++ loop.

    python benchmarks/loop_overhead.py [--steps 50] [--repeat 5] [--json out.json]

1. Loop overhead: a trivial denoiser (returns a preallocated CFG-batch output) at 64x64 latents, batch 2,
   so only the loop itself (guidance, sampler update, Python bookkeeping) is timed.
2. End-to-end effect: a tiny random-weight SD-style model at 64x64 latents (CFG batch 2), where the
   UNet dominates.
Medians over --repeat runs; one JSON row per configuration; ratios python / native.
"""
from __future__ import annotations

import argparse
import sys

import torch
from report import emit, median_time

from ldm_engine.models.configs import ScheduleConfig
from ldm_engine.sampling import make_plan, run_sampler
from ldm_engine.sampling.native import run_native


def loop_rows(steps: int, repeat: int) -> list[dict]:
    shape = (2, 4, 64, 64)
    raw_out = torch.randn(2 * shape[0], *shape[1:])
    rows = []
    for sampler in ("ddim", "euler_a", "dpmpp_2m"):
        plan = make_plan(sampler, steps, ScheduleConfig())
        x = plan.initial_latents(torch.randn(shape))

        def guided(x_in, t):
            u, c = raw_out.chunk(2)
            return u + 7.5 * (c - u)

        py = median_time(lambda: run_sampler(sampler, guided, x, plan, "eps", generator=torch.Generator().manual_seed(0),
                                              disable=True), repeat)
        nat = median_time(lambda: run_native(sampler, lambda x_in, t: raw_out, x, plan, "eps", True, 7.5, 0.0,
                                              torch.Generator().manual_seed(0), disable=True), repeat)
        rows.append({"bench": "loop_overhead", "sampler": sampler, "latent": "2x4x64x64", "steps": steps,
                     "python_ms_per_step": round(1e3 * py / steps, 3), "native_ms_per_step": round(1e3 * nat / steps, 3),
                     "python_over_native": round(py / nat, 2)})
    return rows


def end_to_end_rows(steps: int, repeat: int) -> list[dict]:
    from ldm_engine.models import UNetModel
    from ldm_engine.models.configs import UNetConfig

    cfg = UNetConfig(model_channels=32, channel_mult=(1, 2), attention_resolutions=(2,), num_heads=2, context_dim=32,
                     norm_groups=8)
    torch.manual_seed(0)
    unet = UNetModel(cfg).eval()
    ctx = torch.randn(4, 77, 32)
    shape = (2, 4, 64, 64)
    plan = make_plan("dpmpp_2m", steps, ScheduleConfig())
    x = plan.initial_latents(torch.randn(shape))

    @torch.no_grad()
    def raw(x_in, t):
        return unet(torch.cat([x_in, x_in]), t, ctx)

    def guided(x_in, t):
        u, c = raw(x_in, t).chunk(2)
        return u + 7.5 * (c - u)

    py = median_time(lambda: run_sampler("dpmpp_2m", guided, x, plan, "eps", disable=True), repeat)
    nat = median_time(lambda: run_native("dpmpp_2m", raw, x, plan, "eps", True, 7.5, disable=True), repeat)
    return [{"bench": "end_to_end_tiny_unet", "sampler": "dpmpp_2m", "latent": "2x4x64x64", "steps": steps,
             "python_s": round(py, 3), "native_s": round(nat, 3), "python_over_native": round(py / nat, 3)}]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--json")
    a = p.parse_args()
    rows = loop_rows(a.steps, a.repeat) + end_to_end_rows(min(a.steps, 10), max(1, a.repeat // 2))
    emit(rows, a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
