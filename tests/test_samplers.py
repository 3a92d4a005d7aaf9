"""Every sampler's trajectory matches diffusers' corresponding scheduler, given identical model outputs
at each step (<= 1e-5), for eps and v prediction and every timestep spacing."""
import math

import pytest
import torch

from ldm_engine.models.configs import ScheduleConfig
from ldm_engine.sampling import make_plan, run_sampler

TOL = 1e-5
# Trajectories are compared in float64 so that the bound measures the algorithm, not float32 rounding
# (PLMS with v-prediction amplifies that rounding to ~3e-5 in float32).
DTYPE = torch.float64
FIXED = torch.randn(2, 4, 6, 5, generator=torch.Generator().manual_seed(42), dtype=torch.float64)


def fake_model(x, t):
    """A smooth deterministic stand-in for a UNet that depends on x and t and keeps latents O(1), as a
    trained denoiser does (scale-invariant in x, since the sigma-space samplers feed it rescaled input)."""
    t = float(t)
    x = x / x.std()
    return (0.9 + 0.05 * math.cos(t / 300.0)) * x + 0.1 * FIXED * math.sin(t / 150.0 + 0.3)


def diffusers_scheduler(name, spacing, pred):
    import diffusers as d

    common = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000,
                  steps_offset=1, timestep_spacing=spacing, prediction_type={"eps": "epsilon", "v": "v_prediction"}[pred])
    if name == "ddim":
        return d.DDIMScheduler(set_alpha_to_one=False, clip_sample=False, **common)
    if name == "ddpm":
        return d.DDPMScheduler(clip_sample=False, variance_type="fixed_small", **common)
    if name == "plms":
        return d.PNDMScheduler(skip_prk_steps=True, set_alpha_to_one=False, **common)
    if name == "euler":
        return d.EulerDiscreteScheduler(**common)
    if name == "euler_a":
        return d.EulerAncestralDiscreteScheduler(**common)
    return d.DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2, final_sigmas_type="zero",
                                         use_karras_sigmas=name == "dpmpp_2m_karras", **common)


def diffusers_trajectory(scheduler, steps, noise, eta, seed, start=0):
    scheduler.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    x = noise * scheduler.init_noise_sigma
    timesteps = scheduler.timesteps[start:]
    for t in timesteps:
        out = fake_model(scheduler.scale_model_input(x, t), t)
        kw = {"eta": eta} if hasattr(scheduler, "eta") or "DDIM" in type(scheduler).__name__ else {}
        if "Euler" in type(scheduler).__name__ or "DDPM" in type(scheduler).__name__ or kw:
            kw["generator"] = g
        x = scheduler.step(out, t, x, **kw).prev_sample
    return x


SAMPLER_NAMES = ["ddim", "ddpm", "plms", "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras"]


@pytest.mark.parametrize("name", SAMPLER_NAMES)
@pytest.mark.parametrize("pred", ["eps", "v"])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", [7, 20])
def test_trajectory_matches_diffusers(name, pred, spacing, steps):
    if name == "dpmpp_2m_karras" and spacing != "leading":
        pytest.skip("Karras sigmas ignore the spacing")
    cfg = ScheduleConfig(timestep_spacing=spacing, steps_offset=1)
    noise = torch.randn(2, 4, 6, 5, generator=torch.Generator().manual_seed(0), dtype=DTYPE)
    expected = diffusers_trajectory(diffusers_scheduler(name, spacing, pred), steps, noise, 0.0, seed=5)
    plan = make_plan(name, steps, cfg)
    got = run_sampler(name, fake_model, plan.initial_latents(noise), plan, pred,
                      generator=torch.Generator().manual_seed(5), disable=True)
    assert expected.abs().max() < 20  # a realistic latent range, where 1e-5 is a meaningful bound
    assert (got - expected).abs().max().item() <= TOL


@pytest.mark.parametrize("eta", [0.5, 1.0])
@pytest.mark.parametrize("pred", ["eps", "v"])
def test_ddim_eta_matches_diffusers(eta, pred):
    noise = torch.randn(2, 4, 6, 5, generator=torch.Generator().manual_seed(1))
    expected = diffusers_trajectory(diffusers_scheduler("ddim", "leading", pred), 15, noise, eta, seed=9)
    plan = make_plan("ddim", 15, ScheduleConfig())
    got = run_sampler("ddim", fake_model, noise, plan, pred, eta=eta, generator=torch.Generator().manual_seed(9),
                      disable=True)
    assert (got - expected).abs().max().item() <= TOL


@pytest.mark.parametrize("name", ["ddim", "euler", "dpmpp_2m"])
def test_img2img_start_matches_diffusers(name):
    """SDEdit: skip the first steps and noise the clean latent to the first remaining one."""
    steps, start = 20, 8
    x0 = torch.randn(2, 4, 6, 5, generator=torch.Generator().manual_seed(2))
    noise = torch.randn(2, 4, 6, 5, generator=torch.Generator().manual_seed(3))
    sch = diffusers_scheduler(name, "leading", "eps")
    sch.set_timesteps(steps)
    if hasattr(sch, "set_begin_index"):
        sch.set_begin_index(start)
    ts = sch.timesteps[start:]
    x = sch.add_noise(x0, noise, ts[:1])
    for t in ts:
        x = sch.step(fake_model(sch.scale_model_input(x, t), t), t, x).prev_sample
    plan = make_plan(name, steps, ScheduleConfig()).tail(start)
    got = run_sampler(name, fake_model, plan.noised(x0, noise), plan, "eps", disable=True)
    assert (got - x).abs().max().item() <= TOL


def test_unknown_sampler_and_bad_steps():
    with pytest.raises(ValueError, match="unknown sampler 'heun'.*ddim"):
        make_plan("heun", 10, ScheduleConfig())
    with pytest.raises(ValueError, match=">= 1"):
        make_plan("ddim", 0, ScheduleConfig())
    with pytest.raises(ValueError, match="cannot exceed"):
        make_plan("ddim", 1001, ScheduleConfig())
