"""The TCD sampler: trajectories against diffusers' TCDScheduler for several gammas (<= 1e-5), the
native loop against Python (<= 1e-6), the pipeline's default gamma 0.3 and a whole pipeline against
StableDiffusionPipeline + TCDScheduler (<= 2/255)."""
import math

import numpy as np
import pytest
import torch

from ldm_engine import Pipeline, _C
from ldm_engine.models.configs import ScheduleConfig
from conftest import FAKE_PATTERN, smooth_fake_model

from ldm_engine.sampling import make_plan, run_sampler
from ldm_engine.sampling.native import plan_arrays, run_native
from ldm_engine.sampling.tcd import intermediate_timestep

TOL = 1e-5
PRED = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}


fake_model = smooth_fake_model
FIXED = FAKE_PATTERN


def diffusers_trajectory(steps, pred, gamma, noise, seed):
    import diffusers

    sch = diffusers.TCDScheduler(prediction_type=PRED[pred])
    sch.set_timesteps(steps)
    g, x = torch.Generator().manual_seed(seed), noise
    for t in sch.timesteps:
        kw = {} if gamma is None else {"eta": gamma}  # None: the scheduler's own default, 0.3
        x = sch.step(fake_model(x, t), t, x, generator=g, **kw).prev_sample
    return x, sch.timesteps.numpy()


@pytest.mark.parametrize("pred", ["eps", "v", "x0"])
@pytest.mark.parametrize("steps", [1, 2, 4, 8])
@pytest.mark.parametrize("gamma", [None, 0.0, 0.7, 1.0])
def test_trajectory_matches_diffusers(pred, steps, gamma):
    noise = torch.randn(2, 4, 6, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    expected, timesteps = diffusers_trajectory(steps, pred, gamma, noise, seed=5)
    plan = make_plan("tcd", steps, ScheduleConfig())
    np.testing.assert_array_equal(plan.timesteps, timesteps)
    got = run_sampler("tcd", fake_model, noise, plan, pred, eta=gamma, generator=torch.Generator().manual_seed(5),
                      disable=True)
    assert expected.abs().max() < 20
    assert (got - expected).abs().max().item() <= TOL


def test_intermediate_timestep_rounds_as_diffusers():
    for gamma in (0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0):
        for t_next in range(0, 1000, 7):
            want = int(torch.floor((1 - gamma) * torch.tensor(t_next)).to(dtype=torch.long))
            assert intermediate_timestep(t_next, gamma) == want


def _raw(x, t):
    t = float(t)
    f = FIXED.float()
    return torch.cat([0.9 * x + 0.1 * f * math.sin(t / 150), (0.85 + 0.05 * math.cos(t / 300)) * x + 0.2 * f * math.sin(t / 100)])


@pytest.mark.parametrize("pred", ["eps", "v"])
@pytest.mark.parametrize("gamma", [None, 0.0, 0.5, 1.0])
@pytest.mark.parametrize("guidance", [1.0, 2.0])
def test_native_loop_equals_python(pred, gamma, guidance):
    guided = guidance != 1.0
    plan = make_plan("tcd", 6, ScheduleConfig())
    x = torch.randn(2, 4, 6, 5, generator=torch.Generator().manual_seed(0))

    def model(x_in, t):
        u, c = _raw(x_in, t).chunk(2)
        return u + guidance * (c - u) if guided else u

    expected = run_sampler("tcd", model, x, plan, pred, eta=gamma, generator=torch.Generator().manual_seed(1),
                           disable=True)
    raw = _raw if guided else (lambda x_in, t: _raw(x_in, t)[: len(x_in)])
    got = run_native("tcd", raw, x, plan, pred, guided, guidance, gamma, torch.Generator().manual_seed(1), disable=True)
    assert (got - expected).abs().max().item() <= 1e-6


def test_step_table_and_native_errors():
    from ldm_engine.sampling.cuda_graph import bucket_key, step_table

    plan = make_plan("tcd", 4, ScheduleConfig())
    table = step_table("tcd", plan)  # gamma 0.3 by default
    arrays = plan_arrays("tcd", plan, 0.3)
    for i in range(4):
        a_s, a_next = arrays["abar_s"][i], arrays["abar_prev"][i]
        assert table[i, 2] == np.float32(math.sqrt(a_s)) and table[i, 3] == np.float32(math.sqrt(1 - a_s))
        if i < 3:
            assert table[i, 15] == np.float32(math.sqrt(a_next / a_s))
    assert table[-1, 4] == 0 and (table[:-1, 4] > 0).all()  # fresh noise between steps only
    assert (step_table("tcd", plan, eta=0.0)[:, 4] == 0).all()  # gamma 0: deterministic
    assert bucket_key("tcd", (1, 4, 8, 8), 4, True, "v")[0] == 5
    args = dict(x=np.zeros((1, 4, 2, 2), np.float32), sampler="tcd", prediction="eps", guided=False, guidance=1.0,
                eta=0.3, denoiser=lambda i, t, x: np.zeros((1, 4, 2, 2), np.float32),
                noise=lambda: np.zeros((1, 4, 2, 2), np.float32), **plan_arrays("tcd", plan, 0.3))
    with pytest.raises(ValueError, match="tcd needs one intermediate alpha-bar"):
        _C.run_loop(**{**args, "abar_s": [0.5]})
    with pytest.raises(ValueError, match="gamma \\(eta\\) must be in \\[0, 1\\]"):
        _C.run_loop(**{**args, "eta": 1.5})
    with pytest.raises(ValueError, match="needs a noise source"):
        _C.run_loop(**{**args, "noise": None})


def test_bad_gamma_is_refused():
    plan = make_plan("tcd", 4, ScheduleConfig())
    with pytest.raises(ValueError, match="gamma \\(eta=\\) must be in \\[0, 1\\], got 1.5"):
        run_sampler("tcd", fake_model, torch.zeros(1, 4, 2, 2), plan, "eps", eta=1.5, disable=True)
    with pytest.raises(ValueError, match="eta must be >= 0, got -1.0"):
        run_sampler("ddim", fake_model, torch.zeros(1, 4, 2, 2), make_plan("ddim", 4, ScheduleConfig()), "eps", eta=-1,
                    disable=True)


# ---- the pipeline -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pipe(sd1_folder):
    return Pipeline.from_pretrained(sd1_folder)


def test_pipeline_default_gamma_is_0_3(pipe):
    kw = dict(height=16, width=16, num_inference_steps=4, guidance_scale=1.5, sampler="tcd", seed=2,
              output_type="latent", progress=False)
    default = pipe("a cat", **kw).latents
    assert torch.equal(default, pipe("a cat", eta=0.3, **kw).latents)
    assert not torch.allclose(default, pipe("a cat", eta=0.0, **kw).latents)
    with pytest.raises(ValueError, match="must be in \\[0, 1\\]"):
        pipe("a cat", eta=-0.1, **kw)


@pytest.fixture(scope="module")
def diffusers_tcd(sd1_folder):
    import diffusers

    ref = diffusers.StableDiffusionPipeline.from_pretrained(sd1_folder, safety_checker=None, requires_safety_checker=False)
    ref.scheduler = diffusers.TCDScheduler.from_config(ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    return ref


@pytest.mark.parametrize("scheduler", ["cpp", "python"])
@pytest.mark.parametrize("gamma", [0.3, 0.0])
def test_pipeline_matches_diffusers(diffusers_tcd, pipe, scheduler, gamma):
    kw = dict(num_inference_steps=4, guidance_scale=1.5, height=16, width=16, output_type="np")
    expected = diffusers_tcd("a photo of a cat", eta=gamma, generator=torch.Generator().manual_seed(1), **kw).images
    pipe.scheduler = scheduler
    try:
        got = pipe("a photo of a cat", eta=gamma, seed=1, sampler="tcd", progress=False, **kw).images
    finally:
        pipe.scheduler = "cpp"
    assert np.abs(got - expected).max() <= 2 / 255
