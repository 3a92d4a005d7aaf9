"""Defaults that match diffusers: the inpainting strength of 9-channel models, and the timestep spacing
a sampler takes from a diffusers scheduler config that leaves it unset (as `from_config` swaps do)."""
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from ldm_engine import Pipeline
from ldm_engine.loading.diffusers_config import schedule_config
from ldm_engine.models.configs import ScheduleConfig
from ldm_engine.sampling import make_plan, schedule_for

TOL = 2 / 255


def _image(seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (16, 16, 3), dtype=np.uint8))


def _mask():
    m = np.zeros((16, 16), dtype=np.uint8)
    m[4:12, 2:10] = 255
    return Image.fromarray(m)


# ---- strength -------------------------------------------------------------------------------------

def test_inpainting_model_defaults_to_strength_1_like_diffusers(inpaint_folder):
    import diffusers

    ref = diffusers.StableDiffusionInpaintPipeline.from_pretrained(inpaint_folder, safety_checker=None,
                                                                   requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=8, guidance_scale=5.0, output_type="np", height=16, width=16)
    expected = ref("a red sofa", image=_image(), mask_image=_mask(), generator=torch.Generator().manual_seed(6), **kw).images
    pipe = Pipeline.from_pretrained(inpaint_folder)
    got = pipe("a red sofa", image=_image(), mask_image=_mask(), seed=6, progress=False, **kw).images
    assert np.abs(got - expected).max() <= TOL
    at_08 = pipe("a red sofa", image=_image(), mask_image=_mask(), seed=6, strength=0.8, progress=False, **kw).images
    assert np.abs(at_08 - got).max() > TOL  # the default is not 0.8


def test_img2img_keeps_strength_0_8_like_diffusers(sd1_folder):
    import diffusers

    ref = diffusers.StableDiffusionImg2ImgPipeline.from_pretrained(sd1_folder, safety_checker=None,
                                                                   requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=10, guidance_scale=5.0, output_type="np")
    expected = ref("a red circle", image=_image(1), generator=torch.Generator().manual_seed(4), **kw).images
    got = Pipeline.from_pretrained(sd1_folder)("a red circle", image=_image(1), seed=4, progress=False, **kw).images
    assert np.abs(got - expected).max() <= TOL


def test_cli_strength_default_is_left_to_the_pipeline():
    from ldm_engine.cli import parser

    assert parser().parse_args(["x"]).strength is None


# ---- timestep spacing of a swapped-in scheduler ---------------------------------------------------

SCHEDULERS = {  # sampler -> (diffusers scheduler class, from_config overrides)
    "ddim": ("DDIMScheduler", {}), "ddpm": ("DDPMScheduler", {}), "plms": ("PNDMScheduler", {"skip_prk_steps": True}),
    "euler": ("EulerDiscreteScheduler", {}), "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "lcm": ("LCMScheduler", {}), "tcd": ("TCDScheduler", {}),
}


def _saved_config(folder, variant: str) -> dict:
    """A DDIM scheduler config as diffusers saves it, then edited to one of the variants."""
    import diffusers

    diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
                            clip_sample=False, set_alpha_to_one=False).save_pretrained(folder)
    path = folder / "scheduler_config.json"
    c = json.loads(path.read_text())
    if variant == "missing":  # as configs saved before diffusers wrote these keys
        del c["timestep_spacing"], c["steps_offset"]
    elif variant == "listed":  # present, but recorded as defaults
        c |= {"timestep_spacing": "trailing", "steps_offset": 3, "_use_default_values": ["timestep_spacing", "steps_offset"]}
    elif variant == "trailing":  # an explicit spacing, the offset left unset
        c["timestep_spacing"] = "trailing"
        del c["steps_offset"]
    path.write_text(json.dumps(c))
    return c


@pytest.mark.parametrize("variant", ["explicit", "missing", "listed", "trailing"])
@pytest.mark.parametrize("sampler", list(SCHEDULERS))
def test_timesteps_follow_diffusers_from_config(tmp_path, variant, sampler):
    import diffusers

    c = _saved_config(tmp_path, variant)
    original = diffusers.DDIMScheduler.from_pretrained(tmp_path)
    name, overrides = SCHEDULERS[sampler]
    swapped = getattr(diffusers, name).from_config(original.config, **overrides)
    steps = 7
    swapped.set_timesteps(steps)
    schedule, _ = schedule_config(c)
    plan = make_plan(sampler, steps, schedule)
    want = swapped.timesteps.numpy()
    if sampler == "plms":  # PNDM repeats its second timestep for the improved-Euler start
        want = np.unique(want)[::-1]
    np.testing.assert_allclose(plan.timesteps.astype(np.float64), want.astype(np.float64), atol=1e-4)
    if sampler in ("euler", "euler_a"):
        np.testing.assert_allclose(plan.sigmas, swapped.sigmas.numpy(), rtol=1e-5)


def test_unset_fields_take_each_samplers_default():
    cfg = ScheduleConfig(timestep_spacing="leading", steps_offset=1, explicit=("beta_start",))
    assert (schedule_for("euler", cfg).timestep_spacing, schedule_for("euler", cfg).steps_offset) == ("linspace", 0)
    assert (schedule_for("ddim", cfg).timestep_spacing, schedule_for("ddim", cfg).steps_offset) == ("leading", 0)
    explicit = ScheduleConfig(timestep_spacing="trailing", explicit=("timestep_spacing",))
    assert schedule_for("euler", explicit).timestep_spacing == "trailing"
    single_file = ScheduleConfig()  # explicit None: every field as given (original checkpoints, presets)
    assert schedule_for("euler", single_file) is single_file


def test_pipeline_on_an_old_config_swaps_like_diffusers(sd1_folder, tmp_path):
    """A folder whose scheduler config predates timestep_spacing: Euler runs with its own linspace spacing,
    as StableDiffusionPipeline does after EulerDiscreteScheduler.from_config(pipe.scheduler.config)."""
    import diffusers

    folder = tmp_path / "old"
    shutil.copytree(sd1_folder, folder)
    _saved_config(folder / "scheduler", "missing")
    pipe = Pipeline.from_pretrained(folder)
    assert "timestep_spacing" not in pipe.config.schedule.explicit
    ref = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    ref.scheduler = diffusers.EulerDiscreteScheduler.from_config(ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    assert ref.scheduler.config.timestep_spacing == "linspace"
    kw = dict(num_inference_steps=6, guidance_scale=6.0, height=16, width=16, output_type="np")
    expected = ref("a photo of a cat", generator=torch.Generator().manual_seed(3), **kw).images
    got = pipe("a photo of a cat", seed=3, sampler="euler", progress=False, **kw).images
    assert np.abs(got - expected).max() <= TOL


@pytest.mark.parametrize("offset", [0, "missing"])
def test_stable_diffusion_folders_see_the_pipelines_offset_fixup(sd1_folder, tmp_path, offset):
    """diffusers' StableDiffusionPipeline rewrites an explicit steps_offset != 1 to 1 on load, so schedulers
    swapped in from its config see 1; a missing one stays listed as defaulted (the new scheduler's 0)."""
    import warnings

    import diffusers

    from ldm_engine.loading import load_checkpoint

    folder = tmp_path / "sd"
    shutil.copytree(sd1_folder, folder)
    path = folder / "scheduler" / "scheduler_config.json"
    c = json.loads(path.read_text())
    if offset == "missing":
        del c["steps_offset"]
    else:
        c["steps_offset"] = offset
    path.write_text(json.dumps(c))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # diffusers' deprecation note about the offset
        ref = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    schedule = load_checkpoint(folder).config.schedule
    for sampler in ("ddim", "euler", "dpmpp_2m"):
        name, overrides = SCHEDULERS[sampler]
        swapped = getattr(diffusers, name).from_config(ref.scheduler.config, **overrides)
        swapped.set_timesteps(7)
        np.testing.assert_allclose(make_plan(sampler, 7, schedule).timesteps.astype(np.float64),
                                   swapped.timesteps.numpy().astype(np.float64), atol=1e-4)


# ---- the folder's own scheduler is the default sampler -------------------------------------------


@pytest.mark.parametrize("scheduler, expected", [
    ("EulerAncestralDiscreteScheduler", "euler_a"), ("DPMSolverMultistepScheduler", "dpmpp_2m"),
    ("PNDMScheduler", "plms"), ("LCMScheduler", "lcm")])
def test_a_call_without_sampler_runs_the_folders_scheduler_as_diffusers_does(sd1_folder, tmp_path, scheduler, expected):
    import diffusers

    folder = tmp_path / "model"
    shutil.copytree(sd1_folder, folder)
    base = diffusers.DDIMScheduler.from_pretrained(sd1_folder / "scheduler")
    options = {"skip_prk_steps": True} if scheduler == "PNDMScheduler" else {}
    getattr(diffusers, scheduler).from_config(base.config, **options).save_pretrained(folder / "scheduler")
    index = json.loads((folder / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", scheduler]
    (folder / "model_index.json").write_text(json.dumps(index))

    ref = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=4, guidance_scale=1.5, height=16, width=16, output_type="np")
    expected_images = ref("a red circle", generator=torch.Generator().manual_seed(5), **kw).images
    pipe = Pipeline.from_pretrained(folder)
    assert pipe.config.default_sampler == expected
    got = pipe("a red circle", seed=5, progress=False, **kw).images
    assert np.abs(got - expected_images).max() <= TOL


def test_schedulers_without_a_matching_sampler_fall_back_to_ddim():
    from ldm_engine.loading.diffusers_config import sampler_for_scheduler

    assert sampler_for_scheduler({"_class_name": "DPMSolverMultistepScheduler", "use_karras_sigmas": True}) == "dpmpp_2m_karras"
    assert sampler_for_scheduler({"_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "sde-dpmsolver++"}) is None
    assert sampler_for_scheduler({"_class_name": "PNDMScheduler"}) is None  # with the Runge-Kutta warm-up
    assert sampler_for_scheduler({"_class_name": "UniPCMultistepScheduler"}) is None
