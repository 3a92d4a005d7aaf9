"""End-to-end parity of the Pipeline with diffusers' pipelines (same tiny weights, prompt, seed), and
clear errors for bad arguments."""
import numpy as np
import pytest
import torch
from PIL import Image

from ldm_engine import Pipeline
from ldm_engine.pipeline import NonFiniteError

TOL = 2 / 255


def _diffusers(folder, sampler):
    import diffusers

    ref = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    if sampler == "euler":
        ref.scheduler = diffusers.EulerDiscreteScheduler.from_config(ref.scheduler.config)
    elif sampler == "dpmpp_2m":
        ref.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(ref.scheduler.config, final_sigmas_type="zero")
    return ref


@pytest.fixture(scope="module")
def pipes(sd1_folder, sd2_folder):
    return {"sd1": Pipeline.from_pretrained(sd1_folder), "sd2": Pipeline.from_pretrained(sd2_folder)}


@pytest.mark.parametrize("style", ["sd1", "sd2"])  # eps and v prediction
@pytest.mark.parametrize("sampler", ["ddim", "euler", "dpmpp_2m"])
def test_txt2img_matches_diffusers(style, sampler, pipes, sd1_folder, sd2_folder):
    ref = _diffusers(sd1_folder if style == "sd1" else sd2_folder, sampler)
    kw = dict(num_inference_steps=6, guidance_scale=6.0, height=16, width=24, output_type="np")
    expected = ref(["a photo of a cat", "a red circle"], negative_prompt=["blurry", ""], num_images_per_prompt=2,
                   generator=torch.Generator().manual_seed(3), **kw).images
    got = pipes[style](["a photo of a cat", "a red circle"], negative_prompt=["blurry", ""], num_images_per_prompt=2,
                       seed=3, sampler=sampler, progress=False, **kw).images
    assert got.shape == expected.shape == (4, 16, 24, 3)
    assert np.abs(got - expected).max() <= TOL


@pytest.mark.parametrize("style", ["sd1", "sd2"])
@pytest.mark.parametrize("sampler", ["ddim", "euler", "dpmpp_2m"])
def test_img2img_matches_diffusers(pipes, sd1_folder, sd2_folder, style, sampler):
    import diffusers

    folder = sd1_folder if style == "sd1" else sd2_folder
    ref = diffusers.StableDiffusionImg2ImgPipeline(**_diffusers(folder, sampler).components)
    ref.set_progress_bar_config(disable=True)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8))
    kw = dict(num_inference_steps=10, strength=0.6, guidance_scale=5.0, output_type="np")
    expected = ref("a red circle", image=image, generator=torch.Generator().manual_seed(4), **kw).images
    got = pipes[style]("a red circle", image=image, seed=4, sampler=sampler, progress=False, **kw).images
    assert np.abs(got - expected).max() <= TOL


def test_same_seed_same_image_and_latents_override(pipes):
    p = pipes["sd1"]
    a = p("x", height=16, width=16, num_inference_steps=3, seed=11, output_type="np", progress=False)
    b = p("x", height=16, width=16, num_inference_steps=3, seed=11, output_type="np", progress=False)
    np.testing.assert_array_equal(a.images, b.images)
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(11))
    c = p("x", height=16, width=16, num_inference_steps=3, latents=noise, output_type="np", progress=False)
    np.testing.assert_allclose(c.images, a.images, atol=1e-6)


def test_guidance_one_skips_the_unconditional_branch(pipes):
    p, calls = pipes["sd1"], []
    real = p.backend.denoise
    p.backend.denoise = lambda z, *a, **k: calls.append(z.shape[0]) or real(z, *a, **k)
    try:
        p("x", height=16, width=16, num_inference_steps=2, guidance_scale=1.0, seed=0, progress=False)
    finally:
        p.backend.denoise = real
    assert calls == [1, 1]


def test_pil_output_and_seed(pipes):
    out = pipes["sd1"]("x", height=16, width=16, num_inference_steps=2, seed=5, progress=False)
    assert isinstance(out.images[0], Image.Image) and out.images[0].size == (16, 16) and out.seed == 5


@pytest.mark.parametrize("kwargs, message", [
    (dict(height=10), "height must be a multiple of 4"),
    (dict(num_inference_steps=0), "num_inference_steps must be an integer >= 1"),
    (dict(strength=1.5, image=Image.new("RGB", (16, 16))), r"strength must be in \[0, 1\]"),
    (dict(guidance_scale=-1.0), "guidance_scale must be >= 0"),
    (dict(sampler="heun"), "unknown sampler 'heun'"),
    (dict(mask_image=Image.new("L", (16, 16))), "mask_image needs image"),
    (dict(image=Image.new("RGB", (16, 16)), mask_image=Image.new("L", (8, 16))), r"mask size \(8, 16\).*differs"),
    (dict(output_type="jpeg"), "output_type must be one of"),
])
def test_bad_arguments(pipes, kwargs, message):
    kw = dict(height=16, width=16, num_inference_steps=2, progress=False) | kwargs
    with pytest.raises(ValueError, match=message):
        pipes["sd1"]("x", **kw)


def test_nan_names_the_stage(pipes):
    p = pipes["sd1"]
    real = p.backend.decode
    p.backend.decode = lambda z: real(z) * float("nan")
    try:
        with pytest.raises(NonFiniteError, match="decoded image.*float32"):
            p("x", height=16, width=16, num_inference_steps=1, seed=0, progress=False)
    finally:
        p.backend.decode = real


def _mask(h=16, w=16):
    m = np.zeros((h, w), dtype=np.uint8)
    m[4:12, 2:10] = 255
    return Image.fromarray(m)


def _image(h=16, w=16, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("strength", [1.0, 0.7])
def test_inpaint_9_channel_matches_diffusers(inpaint_folder, strength):
    import diffusers

    ref = diffusers.StableDiffusionInpaintPipeline.from_pretrained(inpaint_folder, safety_checker=None,
                                                                   requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=8, guidance_scale=5.0, strength=strength, output_type="np", height=16, width=16)
    expected = ref("a red sofa", image=_image(), mask_image=_mask(), generator=torch.Generator().manual_seed(6), **kw).images
    got = Pipeline.from_pretrained(inpaint_folder)("a red sofa", image=_image(), mask_image=_mask(), seed=6,
                                                   progress=False, **kw).images
    assert np.abs(got - expected).max() <= TOL


def test_inpaint_4_channel_blends_like_diffusers(pipes, sd1_folder):
    import diffusers

    ref = diffusers.StableDiffusionInpaintPipeline(**_diffusers(sd1_folder, "ddim").components)
    ref.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=8, guidance_scale=5.0, strength=1.0, output_type="np", height=16, width=16)
    expected = ref("a cat", image=_image(), mask_image=_mask(), generator=torch.Generator().manual_seed(2), **kw).images
    got = pipes["sd1"]("a cat", image=_image(), mask_image=_mask(), seed=2, progress=False, **kw).images
    assert np.abs(got - expected).max() <= TOL


@pytest.mark.parametrize("sampler", ["ddim", "euler"])
def test_upscale_matches_diffusers(upscaler_folder, sampler):
    import diffusers

    ref = diffusers.StableDiffusionUpscalePipeline.from_pretrained(upscaler_folder)
    ref.set_progress_bar_config(disable=True)
    if sampler == "euler":
        ref.scheduler = diffusers.EulerDiscreteScheduler.from_config(ref.scheduler.config)
    low = _image(8, 12, seed=3)
    kw = dict(num_inference_steps=6, guidance_scale=4.0, noise_level=40, output_type="np")
    expected = ref("a tree", image=low, generator=torch.Generator().manual_seed(8), **kw).images
    pipe = Pipeline.from_pretrained(upscaler_folder)
    got = pipe("a tree", image=low, seed=8, sampler=sampler, progress=False, **kw).images
    assert got.shape == expected.shape == (1, 16, 24, 3)  # the tiny autoencoder upsamples by 2
    assert np.abs(got - expected).max() <= TOL


def test_task_errors(inpaint_folder, upscaler_folder):
    with pytest.raises(ValueError, match="inpainting model: pass image and mask_image"):
        Pipeline.from_pretrained(inpaint_folder)("x", height=16, width=16, progress=False)
    up = Pipeline.from_pretrained(upscaler_folder)
    with pytest.raises(ValueError, match="upscaler: pass the low-resolution image"):
        up("x", progress=False)
    with pytest.raises(ValueError, match=r"noise_level must be in \[0, 350\]"):
        up("x", image=_image(8, 8), noise_level=400, progress=False)
