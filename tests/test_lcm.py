"""The LCM sampler and LCM-distilled UNets: trajectories against diffusers' LCMScheduler (<= 1e-5), the
native loop against Python (<= 1e-6), the guidance-embedding UNet against diffusers, whole pipelines
against LatentConsistencyModelPipeline and StableDiffusionPipeline + LCMScheduler (<= 2/255), the graph
backends against torch (>= 40 dB), the CLI, and clear errors."""
import json
import math

import numpy as np
import pytest
import torch

from conftest import FAKE_PATTERN, smooth_fake_model

from ldm_engine import Pipeline
from ldm_engine.bench import psnr
from ldm_engine.models.configs import ScheduleConfig
from ldm_engine.sampling import make_plan, run_sampler
from ldm_engine.sampling.lcm import boundary_scalings
from ldm_engine.sampling.native import run_native

TOL = 1e-5
PIXEL_TOL = 2 / 255
PRED = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}


fake_model = smooth_fake_model
FIXED = FAKE_PATTERN


@pytest.fixture(scope="module")
def lcm_folder(tmp_path_factory):
    """An LCM-distilled tiny model saved as diffusers saves LCM checkpoints: a UNet with
    time_cond_proj_dim, an LCMScheduler, LatentConsistencyModelPipeline as the pipeline class."""
    import diffusers
    from conftest import save_diffusers_folder

    root = save_diffusers_folder(tmp_path_factory.mktemp("lcm"), "sd1", time_cond_proj_dim=256)
    diffusers.LCMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1
                           ).save_pretrained(root / "scheduler")
    index = json.loads((root / "model_index.json").read_text())
    index |= {"_class_name": "LatentConsistencyModelPipeline", "scheduler": ["diffusers", "LCMScheduler"]}
    (root / "model_index.json").write_text(json.dumps(index))
    return root


@pytest.fixture(scope="module")
def lcm_pipe(lcm_folder):
    return Pipeline.from_pretrained(lcm_folder)


# ---- the sampler -----------------------------------------------------------------------------------

@pytest.mark.parametrize("original_steps", [50, 20])
@pytest.mark.parametrize("steps", [1, 2, 3, 4, 8, 20])
def test_timesteps_match_diffusers(steps, original_steps):
    import diffusers

    sch = diffusers.LCMScheduler(original_inference_steps=original_steps)
    sch.set_timesteps(steps)
    plan = make_plan("lcm", steps, ScheduleConfig(original_inference_steps=original_steps))
    np.testing.assert_array_equal(plan.timesteps, sch.timesteps.numpy())


def test_boundary_scalings_match_diffusers():
    import diffusers

    sch = diffusers.LCMScheduler()
    for t in (0, 19, 259, 999):
        want = sch.get_scalings_for_boundary_condition_discrete(torch.tensor(t, dtype=torch.float64))
        np.testing.assert_allclose(boundary_scalings(t, 10.0), [float(w) for w in want], rtol=1e-12)


@pytest.mark.parametrize("pred", ["eps", "v", "x0"])
@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_trajectory_matches_diffusers(pred, steps):
    import diffusers

    sch = diffusers.LCMScheduler(prediction_type=PRED[pred])
    sch.set_timesteps(steps)
    noise = torch.randn(2, 4, 6, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    g, x = torch.Generator().manual_seed(5), noise
    for t in sch.timesteps:
        x = sch.step(fake_model(x, t), t, x, generator=g).prev_sample
    plan = make_plan("lcm", steps, ScheduleConfig())
    got = run_sampler("lcm", fake_model, plan.initial_latents(noise), plan, pred,
                      generator=torch.Generator().manual_seed(5), disable=True)
    assert x.abs().max() < 20
    assert (got - x).abs().max().item() <= TOL


def test_img2img_tail_matches_diffusers():
    """Starting part-way (img2img): the last remaining step still returns the consistency estimate."""
    import diffusers

    sch = diffusers.LCMScheduler()
    sch.set_timesteps(6)
    sch.set_begin_index(2)
    x0 = torch.randn(2, 4, 6, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    noise = torch.randn(2, 4, 6, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ts = sch.timesteps[2:]
    x, g = sch.add_noise(x0, noise, ts[:1]), torch.Generator().manual_seed(1)
    for t in ts:
        x = sch.step(fake_model(x, t), t, x, generator=g).prev_sample
    plan = make_plan("lcm", 6, ScheduleConfig()).tail(2)
    got = run_sampler("lcm", fake_model, plan.noised(x0, noise), plan, "eps", generator=torch.Generator().manual_seed(1),
                      disable=True)
    assert (got - x).abs().max().item() <= TOL


def test_bad_steps_are_refused():
    with pytest.raises(ValueError, match="at most original_inference_steps \\(50\\) steps, got 51"):
        make_plan("lcm", 51, ScheduleConfig())
    with pytest.raises(ValueError, match="original_inference_steps must be in \\[1, 1000\\]"):
        make_plan("lcm", 4, ScheduleConfig(original_inference_steps=2000))


# ---- the native loop ---------------------------------------------------------------------------------

def _raw(x, t):
    """[uncond; cond] outputs of a stand-in UNet, float32."""
    t = float(t)
    f = FIXED.float()
    return torch.cat([0.9 * x + 0.1 * f * math.sin(t / 150), (0.85 + 0.05 * math.cos(t / 300)) * x + 0.2 * f * math.sin(t / 100)])


@pytest.mark.parametrize("pred", ["eps", "v"])
@pytest.mark.parametrize("steps", [1, 4, 8])
@pytest.mark.parametrize("guidance", [1.0, 1.5, 8.0])
def test_native_loop_equals_python(pred, steps, guidance):
    guided = guidance != 1.0
    plan = make_plan("lcm", steps, ScheduleConfig())
    x = torch.randn(2, 4, 6, 5, generator=torch.Generator().manual_seed(0))

    def model(x_in, t):
        u, c = _raw(x_in, t).chunk(2)
        return u + guidance * (c - u) if guided else u

    expected = run_sampler("lcm", model, x, plan, pred, generator=torch.Generator().manual_seed(1), disable=True)
    raw = _raw if guided else (lambda x_in, t: _raw(x_in, t)[: len(x_in)])
    got = run_native("lcm", raw, x, plan, pred, guided, guidance, None, torch.Generator().manual_seed(1), disable=True)
    assert (got - expected).abs().max().item() <= 1e-6


def test_step_table_holds_the_consistency_scalars():
    from ldm_engine.sampling.cuda_graph import bucket_key, step_table

    plan = make_plan("lcm", 4, ScheduleConfig())
    table = step_table("lcm", plan)
    for i, t in enumerate(plan.timesteps):
        c_skip, c_out = boundary_scalings(int(t), 10.0)
        assert table[i, 10] == np.float32(c_skip) and table[i, 11] == np.float32(c_out)  # c_x, c_d
        if i + 1 < len(plan.timesteps):
            a_next = plan.abar(int(plan.timesteps[i + 1]))
            assert table[i, 15] == np.float32(math.sqrt(a_next)) and table[i, 4] == np.float32(math.sqrt(1 - a_next))
    assert table[-1, 4] == 0  # no fresh noise after the last step
    assert bucket_key("lcm", (1, 4, 8, 8), 4, False, "eps")[0] == 4


# ---- LCM-distilled UNets -----------------------------------------------------------------------------

def test_distilled_unet_matches_diffusers(lcm_folder, lcm_pipe):
    from diffusers import LatentConsistencyModelPipeline, UNet2DConditionModel

    from ldm_engine.models.unet import guidance_embedding

    ref = UNet2DConditionModel.from_pretrained(lcm_folder / "unet").eval()
    assert lcm_pipe.config.unet.time_cond_proj_dim == 256
    w = torch.tensor([7.5, 0.0, 2.0])
    emb = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=256)
    assert (guidance_embedding(w, 256) - emb).abs().max().item() <= 1e-6
    x, ctx = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.randn(3, 77, 32)
    with torch.no_grad():
        want = ref(x, 499, ctx, timestep_cond=emb).sample
        got = lcm_pipe.model.unet(x, 499, ctx, timestep_cond=guidance_embedding(w, 256))
        plain = lcm_pipe.model.unet(x, 499, ctx)
    assert (got - want).abs().max().item() <= 1e-4
    assert (plain - got).abs().max().item() > 1e-3  # the embedding changes the output


@pytest.fixture(scope="module")
def diffusers_lcm(lcm_folder):
    import diffusers

    ref = diffusers.LatentConsistencyModelPipeline.from_pretrained(lcm_folder, safety_checker=None,
                                                                   requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    return ref


@pytest.mark.parametrize("scheduler", ["cpp", "python"])
@pytest.mark.parametrize("steps, guidance", [(4, 8.5), (1, 1.0), (6, 3.0)])
def test_distilled_pipeline_matches_diffusers(diffusers_lcm, lcm_pipe, scheduler, steps, guidance):
    kw = dict(num_inference_steps=steps, guidance_scale=guidance, height=16, width=24, num_images_per_prompt=2,
              output_type="np")
    prompts = ["a photo of a cat", "a red circle"]
    expected = diffusers_lcm(prompts, generator=torch.Generator().manual_seed(3), **kw).images
    lcm_pipe.scheduler = scheduler
    try:
        got = lcm_pipe(prompts, seed=3, sampler="lcm", progress=False, **kw).images
    finally:
        lcm_pipe.scheduler = "cpp"
    assert got.shape == expected.shape == (4, 16, 24, 3)
    assert np.abs(got - expected).max() <= PIXEL_TOL


def test_distilled_model_runs_one_unet_batch_per_step(lcm_pipe):
    calls, real = [], lcm_pipe.backend.denoise

    def spy(z, t, context, extra=None):
        calls.append((z.shape[0], tuple(extra["timestep_cond"].shape)))
        return real(z, t, context, extra)

    lcm_pipe.backend.denoise = spy
    try:
        lcm_pipe(["a", "b"], height=16, width=16, num_inference_steps=3, guidance_scale=8.5, sampler="lcm", seed=0,
                 progress=False)
    finally:
        lcm_pipe.backend.denoise = real
    assert calls == [(2, (2, 256))] * 3


def test_distilled_model_refuses_a_negative_prompt(lcm_pipe):
    with pytest.raises(ValueError, match="LCM-distilled.*no negative prompt"):
        lcm_pipe("a cat", negative_prompt="blurry", height=16, width=16, num_inference_steps=2, sampler="lcm",
                 progress=False)


def test_timestep_cond_on_an_ordinary_unet_is_refused(tiny_sd1):
    with pytest.raises(ValueError, match="timestep_cond is for LCM-distilled UNets"):
        tiny_sd1.unet(torch.zeros(1, 4, 8, 8), 10, torch.zeros(1, 77, 32), timestep_cond=torch.zeros(1, 256))


def test_single_file_round_trip_keeps_the_guidance_projection(lcm_pipe, tmp_path):
    from ldm_engine.loading import load_checkpoint
    from ldm_engine.loading.detect import detect_unet

    sd = lcm_pipe.model.unet.state_dict()
    assert detect_unet(sd).time_cond_proj_dim == 256
    assert "time_embed_cond.weight" in sd and sd["time_embed_cond.weight"].shape == (32, 256)
    from ldm_engine.loading.export import save_single_file

    m, path = lcm_pipe.model, tmp_path / "lcm.safetensors"
    save_single_file(path, m.config, m.unet, m.vae, m.text_encoder)
    again = load_checkpoint(path)
    assert again.config.unet.time_cond_proj_dim == 256 and again.config.schedule == m.config.schedule
    torch.testing.assert_close(again.unet.state_dict()["time_embed_cond.weight"], sd["time_embed_cond.weight"])


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_graph_backends_run_the_distilled_model(lcm_folder, lcm_pipe, backend):
    pytest.importorskip(backend)
    kw = dict(height=16, width=16, num_inference_steps=4, guidance_scale=8.5, sampler="lcm", seed=3,
              output_type="np", progress=False)
    ref = lcm_pipe("a photo of a cat", **kw).images
    opts = {"dtype": torch.float32} if backend == "openvino" else {}
    out = Pipeline.from_pretrained(lcm_folder, backend=backend, progress=False, **opts)("a photo of a cat", **kw).images
    assert np.isfinite(out).all() and psnr(ref, out) >= 40


# ---- ordinary checkpoints (LCM-LoRA style): the LCM sampler with CFG or without ---------------------

@pytest.mark.parametrize("guidance", [1.0, 1.5])
def test_ordinary_model_with_lcm_matches_diffusers(sd1_folder, guidance):
    import diffusers

    ref = diffusers.StableDiffusionPipeline.from_pretrained(sd1_folder, safety_checker=None, requires_safety_checker=False)
    ref.scheduler = diffusers.LCMScheduler.from_config(ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=4, guidance_scale=guidance, height=16, width=16, output_type="np")
    expected = ref("a photo of a cat", generator=torch.Generator().manual_seed(1), **kw).images
    got = Pipeline.from_pretrained(sd1_folder)("a photo of a cat", seed=1, sampler="lcm", progress=False, **kw).images
    assert np.abs(got - expected).max() <= PIXEL_TOL


def test_ordinary_model_img2img_with_lcm_matches_diffusers(sd1_folder):
    import diffusers
    from PIL import Image

    ref = diffusers.StableDiffusionImg2ImgPipeline.from_pretrained(sd1_folder, safety_checker=None,
                                                                   requires_safety_checker=False)
    ref.scheduler = diffusers.LCMScheduler.from_config(ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8))
    kw = dict(num_inference_steps=6, strength=0.5, guidance_scale=1.5, output_type="np")
    expected = ref("a red circle", image=image, generator=torch.Generator().manual_seed(4), **kw).images
    got = Pipeline.from_pretrained(sd1_folder)("a red circle", image=image, seed=4, sampler="lcm", progress=False,
                                               **kw).images
    assert np.abs(got - expected).max() <= PIXEL_TOL


def test_cli_generates_with_lcm(lcm_folder, tmp_path):
    from PIL import Image

    from ldm_engine.cli import main

    out = tmp_path / "lcm.png"
    assert main(["a cat", "--model", str(lcm_folder), "--sampler", "lcm", "--steps", "4", "--guidance", "8.5",
                 "--size", "16x16", "--seed", "1", "-o", str(out)]) == 0
    assert Image.open(out).text["sampler"] == "lcm"


def test_tensorrt_profiles_size_the_distilled_batch_without_cfg(lcm_pipe, tmp_path):
    """No CFG pair for an LCM-distilled model: the UNet (with its timestep_cond input) and the text encoder
    are profiled at the image batch, not twice it."""
    pytest.importorskip("onnx")
    from ldm_engine.export.graphs import Shape
    from ldm_engine.export.onnx_export import export_model
    from ldm_engine.export.trt_engines import profile_for, read_graph

    paths = export_model(lcm_pipe.model, tmp_path, ["unet", "text_encoder"], progress=False)
    shapes = Shape(16, 16, 1), Shape(32, 32, 2), Shape(64, 64, 4)
    unet = profile_for(read_graph(paths["unet"]), *shapes)
    assert unet["timestep_cond"] == ((1, 256), (2, 256), (4, 256))
    assert unet["sample"] == ((1, 4, 8, 8), (2, 4, 16, 16), (4, 4, 32, 32))
    assert profile_for(read_graph(paths["text_encoder"]), *shapes)["input_ids"][0][0] == 1


def test_pipeline_refuses_too_many_steps_before_any_work(lcm_pipe):
    calls, real = [], lcm_pipe.backend.encode_text
    lcm_pipe.backend.encode_text = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        with pytest.raises(ValueError, match="at most original_inference_steps \\(50\\) steps, got 60"):
            lcm_pipe("a cat", num_inference_steps=60, sampler="lcm", height=16, width=16, progress=False)
    finally:
        lcm_pipe.backend.encode_text = real
    assert calls == []
