"""The native (C++) sampling loop against the Python samplers: identical trajectories (<= 1e-6), clear
errors for bad input, and a C++ unit binary (also under AddressSanitizer/UBSan)."""
import math
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from ldm_engine import _C
from ldm_engine.models.configs import ScheduleConfig
from ldm_engine.sampling import make_plan, run_sampler
from ldm_engine.sampling.native import NATIVE_SAMPLERS, native_name, plan_arrays, run_native
from ldm_engine.sampling.schedule import alphas_cumprod_for, spaced_timesteps

TOL = 1e-6
FIXED = torch.randn(2, 4, 6, 5, generator=torch.Generator().manual_seed(42))


def raw_model(x, t):
    """A stand-in UNet on the CFG batch: [uncond; cond], depending on x and t."""
    t = float(t)
    u = 0.9 * x + 0.1 * FIXED * math.sin(t / 150)
    c = (0.85 + 0.05 * math.cos(t / 300)) * x + 0.2 * FIXED * math.sin(t / 100)
    return torch.cat([u, c])


def python_reference(name, plan, x, pred, guidance, guided, eta, seed):
    def model(x_in, t):
        out = raw_model(x_in, t)
        if not guided:
            return out[: len(out) // 2]
        u, c = out.chunk(2)
        return u + guidance * (c - u)

    return run_sampler(name, model, x, plan, pred, eta=eta, generator=torch.Generator().manual_seed(seed), disable=True)


CASES = [(name, pred, steps) for name in NATIVE_SAMPLERS for pred in ("eps", "v") for steps in (1, 4, 15)]


@pytest.mark.parametrize("name, pred, steps", CASES)
@pytest.mark.parametrize("guidance", [1.0, 3.0, 7.5])
def test_native_trajectory_equals_python(name, pred, steps, guidance):
    guided = guidance != 1.0
    plan = make_plan(name, steps, ScheduleConfig())
    x = plan.initial_latents(torch.randn(2, 4, 6, 5, generator=torch.Generator().manual_seed(0)))
    expected = python_reference(name, plan, x, pred, guidance, guided, 0.0, seed=1)
    model = raw_model if guided else (lambda x_in, t: raw_model(x_in, t)[: len(x_in)])
    got = run_native(name, model, x, plan, pred, guided, guidance, 0.0, torch.Generator().manual_seed(1), disable=True)
    assert (got - expected).abs().max().item() <= TOL


@pytest.mark.parametrize("eta", [0.3, 1.0])
@pytest.mark.parametrize("pred", ["eps", "v"])
def test_native_ddim_eta_draws_the_same_noise(eta, pred):
    plan = make_plan("ddim", 10, ScheduleConfig(timestep_spacing="trailing"))
    x = torch.randn(2, 4, 6, 5, generator=torch.Generator().manual_seed(3))
    expected = python_reference("ddim", plan, x, pred, 5.0, True, eta, seed=4)
    got = run_native("ddim", raw_model, x, plan, pred, True, 5.0, eta, torch.Generator().manual_seed(4), disable=True)
    assert (got - expected).abs().max().item() <= TOL


def test_pipeline_cpp_and_python_schedulers_agree(sd2_folder):
    from ldm_engine import Pipeline

    kw = dict(height=16, width=16, num_inference_steps=5, guidance_scale=6.0, seed=2, output_type="np", progress=False)
    for sampler in ("ddim", "euler_a", "dpmpp_2m_karras"):
        a = Pipeline.from_pretrained(sd2_folder, scheduler="python")("a cat", sampler=sampler, **kw).images
        b = Pipeline.from_pretrained(sd2_folder, scheduler="cpp")("a cat", sampler=sampler, **kw).images
        assert np.abs(a - b).max() <= TOL


# ---- bad input: Python exceptions with a message, never a crash -----------------------------------

def _args(**over):
    plan = make_plan("euler", 3, ScheduleConfig())
    args = dict(x=np.zeros((1, 4, 2, 2), np.float32), sampler="euler", prediction="eps",
                timesteps=[float(t) for t in plan.timesteps], abar=[], abar_prev=[],
                sigmas=[float(s) for s in plan.sigmas], guided=True, guidance=5.0, eta=0.0,
                denoiser=lambda i, t, x: np.zeros((2, 4, 2, 2), np.float32), noise=None)
    args.update(over)
    return args


@pytest.mark.parametrize("over, message", [
    (dict(denoiser=lambda i, t, x: np.zeros((1, 4, 2, 2), np.float32)), "denoiser returned 16 values.*expected 32"),
    (dict(denoiser=lambda i, t, x: "nope"), "float32 array"),
    (dict(x=np.zeros((1, 4, 2, 2), np.float64)), "float32"),
    (dict(x=np.zeros((1, 4, 2, 4), np.float32)[..., ::2]), "C-contiguous"),
    (dict(timesteps=[], sigmas=[0.0]), "steps must be >= 1"),
    (dict(sigmas=[1.0, 0.0]), "needs steps \\+ 1 sigmas"),
    (dict(sampler="plms"), "unsupported sampler 'plms'"),
    (dict(prediction="x0"), "prediction must be 'eps' or 'v'"),
    (dict(sampler="euler_a", noise=lambda: np.zeros(3, np.float32)), "noise source returned 3 values"),
])
def test_bad_input_raises(over, message):
    with pytest.raises(ValueError, match=message):
        _C.run_loop(**_args(**over))


def test_denoiser_exception_propagates():
    def boom(i, t, x):
        raise RuntimeError("unet exploded")

    with pytest.raises(RuntimeError, match="unet exploded"):
        _C.run_loop(**_args(denoiser=boom))


def test_native_schedule_tables_match_python():
    for schedule in ("scaled_linear", "linear"):
        cfg = ScheduleConfig(beta_schedule=schedule, beta_start=0.00085 if schedule == "scaled_linear" else 0.0001,
                             beta_end=0.012 if schedule == "scaled_linear" else 0.02)
        native = np.array(_C.alphas_cumprod(schedule, cfg.beta_start, cfg.beta_end, 1000))
        np.testing.assert_allclose(native, alphas_cumprod_for(cfg).numpy(), rtol=2e-6)
    for spacing in ("leading", "trailing", "linspace"):
        for steps in (1, 3, 7, 20, 50, 999):
            cfg = ScheduleConfig(timestep_spacing=spacing)
            assert _C.spaced_timesteps(steps, 1000, spacing, 1) == spaced_timesteps(steps, cfg).tolist()


# ---- the C++ unit binary ------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]


def _build(tmp_path_factory, name, flags):
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    exe = tmp_path_factory.mktemp("cpp") / name
    src = [ROOT / "csrc" / f for f in ("schedule.cpp", "steps.cpp", "loop.cpp")] + [ROOT / "tests/cpp/loop_test.cpp"]
    subprocess.run([cxx, "-std=c++17", "-ffp-contract=off", *flags, f"-I{ROOT / 'csrc'}", *map(str, src), "-o", str(exe)],
                   check=True)
    return exe


@pytest.fixture(scope="module")
def loop_test(tmp_path_factory):
    return _build(tmp_path_factory, "loop_test", ["-O2"])


@pytest.fixture(scope="module")
def loop_test_sanitized(tmp_path_factory):
    return _build(tmp_path_factory, "loop_test_asan", ["-O1", "-g", "-fsanitize=address,undefined",
                                                       "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"])


def _fake_noise():
    k = 0

    def noise(x, generator=None):
        nonlocal k
        i = np.arange(x.numel())
        v = torch.from_numpy((((i * 7919 + k * 104729) % 1000) / 500.0 - 1.0).astype(np.float32)).view(x.shape)
        k += 1
        return v

    return noise


def _case(tmp_path, name, pred, guided, guidance, eta, steps):
    plan = make_plan(name, steps, ScheduleConfig())
    x = plan.initial_latents(torch.randn(1, 4, 3, 5, generator=torch.Generator().manual_seed(0)))
    vec = lambda v, fmt="%.17g": f"{len(v)} " + " ".join(fmt % a for a in v)
    f = tmp_path / "case.txt"
    arr = plan_arrays(name, plan, eta)
    f.write_text("\n".join([f"{native_name(name)} {pred} {int(guided)} {guidance!r} {eta!r}", vec(arr["timesteps"]),
                            vec(arr["abar"]), vec(arr["abar_prev"]), vec(arr["sigmas"]), vec(x.flatten().tolist(), "%.9g"),
                            vec(arr["abar_s"]), repr(arr["timestep_scaling"])]) + "\n")
    return f, plan, x


def _python_twin(name, plan, x, pred, guided, guidance, eta, monkeypatch):
    import ldm_engine.sampling.ddim as ddim
    import ldm_engine.sampling.k_samplers as ks
    import ldm_engine.sampling.lcm as lcm
    import ldm_engine.sampling.tcd as tcd

    noise = _fake_noise()
    for module in (ddim, ks, lcm, tcd):
        monkeypatch.setattr(module, "_noise", noise)
    step = {"i": 0}

    def model(x_in, t):
        i = step["i"]
        step["i"] += 1
        u = 0.9 * x_in + 0.01 * i
        if not guided:
            return u
        c = 0.8 * x_in - 0.02 * i
        return u + guidance * (c - u)

    return run_sampler(name, model, x, plan, pred, eta=eta, disable=True)


@pytest.mark.parametrize("name", ["ddim", "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras", "lcm", "tcd"])
@pytest.mark.parametrize("pred", ["eps", "v"])
def test_cpp_binary_matches_python(loop_test, tmp_path, monkeypatch, name, pred):
    eta = {"ddim": 0.5, "tcd": 0.3}.get(name, 0.0)
    case, plan, x = _case(tmp_path, name, pred, True, 4.0, eta, 8)
    out = subprocess.run([str(loop_test), str(case)], capture_output=True, text=True, check=True).stdout.splitlines()
    rows = {line.split()[0]: line.split()[1:] for line in out}
    got = torch.tensor([float(v) for v in rows["latents"]]).view(x.shape)
    expected = _python_twin(name, plan, x, pred, True, 4.0, eta, monkeypatch)
    assert (got - expected).abs().max().item() <= TOL
    np.testing.assert_allclose([float(v) for v in rows["alphas_cumprod"]], alphas_cumprod_for(ScheduleConfig()).numpy(),
                               rtol=2e-6)
    for spacing in ("leading", "trailing", "linspace"):
        assert [int(v) for v in rows[spacing]] == spaced_timesteps(7, ScheduleConfig(timestep_spacing=spacing)).tolist()


@pytest.mark.parametrize("name", ["ddim", "euler_a", "dpmpp_2m", "lcm", "tcd"])
def test_cpp_binary_is_clean_under_asan_and_ubsan(loop_test_sanitized, tmp_path, name):
    case, _, _ = _case(tmp_path, name, "v", True, 7.5, 0.3 if name in ("ddim", "tcd") else 0.0, 6)
    res = subprocess.run([str(loop_test_sanitized), str(case)], capture_output=True, text=True,
                         env={"ASAN_OPTIONS": "detect_leaks=1:abort_on_error=0", "PATH": "/usr/bin:/bin"})
    assert res.returncode == 0, res.stderr
    assert "runtime error" not in res.stderr and "AddressSanitizer" not in res.stderr
