"""DeepCache step-feature caching (ldm_engine.optimize.step_cache): parity with the reference `deepcache`
package on a diffusers pipeline, the schedules, every backend and loop, and bad input."""
import warnings

import numpy as np
import pytest
import torch

from ldm_engine import Pipeline
from ldm_engine.optimize.step_cache import branch_count, full_steps

TOL = 2 / 255
KW = dict(num_inference_steps=7, guidance_scale=6.0, height=16, width=24, output_type="np", progress=False)


@pytest.fixture(scope="module")
def pipe(sd1_folder):
    return Pipeline.from_pretrained(sd1_folder)


def _deepcache_images(folder, interval, branch, **kw):
    """Images from diffusers' StableDiffusionPipeline with the reference DeepCacheSDHelper enabled."""
    import diffusers
    from DeepCache import DeepCacheSDHelper

    ref = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    helper = DeepCacheSDHelper(pipe=ref)
    helper.set_params(cache_interval=interval, cache_branch_id=branch)
    helper.enable()
    try:
        return ref(["a photo of a cat", "a red circle"], negative_prompt=["blurry", ""],
                   generator=torch.Generator().manual_seed(3), **kw).images
    finally:
        helper.disable()


@pytest.mark.parametrize("interval,branch", [(3, 0), (2, 2), (3, 4), (4, 5)])
def test_matches_the_deepcache_package(pipe, sd1_folder, interval, branch):
    expected = _deepcache_images(sd1_folder, interval, branch, **KW)
    got = pipe(["a photo of a cat", "a red circle"], negative_prompt=["blurry", ""], seed=3, sampler="ddim",
               cache_interval=interval, cache_branch=branch, **KW).images
    plain = pipe(["a photo of a cat", "a red circle"], negative_prompt=["blurry", ""], seed=3, sampler="ddim",
                 **KW).images
    err, change = np.abs(got - expected).max(), np.abs(got - plain).max()
    assert err <= TOL
    assert change > 10 * err  # the cache changed the image far more than we differ: the comparison means something


def test_interval_one_is_the_uncached_image(pipe):
    a = pipe("a red circle", seed=5, **KW).images
    b = pipe("a red circle", seed=5, cache_interval=1, cache_branch=0, **KW).images
    assert np.array_equal(a, b)


def _reference_schedule():
    """The package's non-uniform schedule function. Its module (DeepCache/sd/pipeline_stable_diffusion.py)
    imports diffusers internals that diffusers 0.42 no longer has; the function is plain numpy, so it is
    compiled on its own from that file's source."""
    import ast
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("DeepCache")
    source = (Path(spec.origin).parent / "sd" / "pipeline_stable_diffusion.py").read_text()
    fn = next(n for n in ast.parse(source).body if isinstance(n, ast.FunctionDef) and n.name == "sample_from_quad_center")
    scope = {"np": np}
    exec(compile(ast.Module([fn], []), "pipeline_stable_diffusion.py", "exec"), scope)
    return scope["sample_from_quad_center"]


def test_uniform_and_non_uniform_schedules():
    sample_from_quad_center = _reference_schedule()
    assert full_steps(10, 3) == [0, 3, 6, 9]
    assert full_steps(5, 1) == [0, 1, 2, 3, 4]
    for n, interval in [(50, 3), (50, 5), (50, 2), (25, 4), (20, 3), (100, 3)]:
        with warnings.catch_warnings():  # the reference casts its complex intermediate to real
            warnings.simplefilter("ignore", np.exceptions.ComplexWarning)
            expected, _ = sample_from_quad_center(n, -(-n // interval), center=15, pow=1.4)
        assert full_steps(n, interval, "non-uniform") == sorted(int(i) for i in expected)
    with pytest.raises(ValueError), warnings.catch_warnings():  # no power fits: the reference gives up too
        warnings.simplefilter("ignore", np.exceptions.ComplexWarning)
        sample_from_quad_center(30, 15, center=15, pow=1.4)
    with pytest.raises(ValueError, match="use cache_schedule='uniform'"):
        full_steps(30, 2, "non-uniform")


def test_non_uniform_runs(pipe):
    out = pipe("a red circle", seed=5, cache_interval=3, cache_schedule="non-uniform", **KW).images
    assert np.isfinite(out).all()


def test_img2img_counts_from_its_first_step(pipe, sd1_folder):
    from PIL import Image
    import diffusers
    from DeepCache import DeepCacheSDHelper

    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8))
    ref = diffusers.StableDiffusionImg2ImgPipeline.from_pretrained(sd1_folder, safety_checker=None,
                                                                  requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    helper = DeepCacheSDHelper(pipe=ref)
    helper.set_params(cache_interval=3, cache_branch_id=1)
    helper.enable()
    kw = dict(num_inference_steps=10, strength=0.6, guidance_scale=5.0, output_type="np")
    expected = ref("a red circle", image=image, generator=torch.Generator().manual_seed(4), **kw).images
    helper.disable()
    got = pipe("a red circle", image=image, seed=4, sampler="ddim", progress=False, cache_interval=3,
               cache_branch=1, **kw).images
    assert np.abs(got - expected).max() <= TOL


def test_native_loop_equals_python_loop(sd1_folder):
    from ldm_engine.sampling import native

    if not native.available("ddim"):
        pytest.skip("the native extension is not built")
    py = Pipeline.from_pretrained(sd1_folder, scheduler="python")
    cpp = Pipeline.from_pretrained(sd1_folder, scheduler="cpp")
    kw = dict(KW, cache_interval=3, cache_branch=2, sampler="ddim", seed=8)
    assert np.abs(py("a cat", **kw).images - cpp("a cat", **kw).images).max() <= 1e-5


@pytest.mark.parametrize("sampler", ["euler_a", "dpmpp_2m_karras", "plms", "ddpm", "lcm"])
def test_every_sampler_runs(pipe, sampler):
    out = pipe("a red circle", seed=2, sampler=sampler, cache_interval=2, **KW).images
    assert np.isfinite(out).all()


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_graph_backends_match_torch(sd1_folder, backend):
    pytest.importorskip(backend)
    from ldm_engine.bench import psnr

    kw = dict(KW, cache_interval=3, cache_branch=1, seed=6)
    ref = Pipeline.from_pretrained(sd1_folder)("a red circle", **kw).images
    pipe = Pipeline.from_pretrained(sd1_folder, backend=backend, dtype=torch.float32)
    got = pipe("a red circle", **kw).images
    assert psnr(got, ref) >= 40


def test_inpainting_runs_with_the_cache(inpaint_folder):
    from PIL import Image

    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (16, 16, 3), dtype=np.uint8))
    mask = Image.fromarray((np.arange(256).reshape(16, 16) % 16 > 8).astype(np.uint8) * 255)
    p = Pipeline.from_pretrained(inpaint_folder)
    a = p("a sofa", image=image, mask_image=mask, seed=1, num_inference_steps=6, output_type="np", progress=False,
          cache_interval=2).images
    assert np.isfinite(a).all()


def test_bad_settings_are_refused(pipe):
    top = branch_count(pipe.config.unet) - 1
    for kw, words in [(dict(cache_interval=0), "cache_interval must be an integer >= 1"),
                      (dict(cache_interval=2.5), "cache_interval must be an integer >= 1"),
                      (dict(cache_interval=2, cache_branch=top + 1), f"from 0 (shallowest, fastest) to {top}"),
                      (dict(cache_interval=2, cache_branch=-1), "cache_branch must be"),
                      (dict(cache_interval=2, cache_schedule="quadratic"), "cache_schedule must be one of")]:
        with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
            pipe("x", **KW, **kw)


def test_controlnets_and_the_tensorrt_style_backends_are_refused(sd1_folder, tmp_path):
    from test_controlnet import _hint, make_controlnet

    p = Pipeline.from_pretrained(sd1_folder)
    make_controlnet(sd1_folder, tmp_path / "cn", seed=7)
    p.load_controlnet(tmp_path / "cn")
    with pytest.raises(ValueError, match="cache_interval with ControlNets is not supported"):
        p("x", control_image=_hint(1), cache_interval=2, **KW)

    class NoCache:  # a backend without the step cache's graphs (TensorRT has none)
        name, device, accepts_control = "tensorrt", torch.device("cpu"), True

    p.unload_controlnets()
    p.backend = NoCache()
    with pytest.raises(ValueError, match="the tensorrt backend has no step cache"):
        p("x", cache_interval=2, **KW)


def test_cli_caches_and_records_it(sd1_folder, tmp_path):
    from PIL import Image

    from ldm_engine.cli import main
    from ldm_engine.infotext import parse_infotext

    args = ["a cat", "--model", str(sd1_folder), "--steps", "6", "--seed", "4", "--size", "16x24", "--sampler", "ddim"]
    assert main([*args, "-o", str(tmp_path / "plain.png")]) == 0
    assert main([*args, "--cache-interval", "3", "--cache-branch", "1", "-o", str(tmp_path / "cached.png")]) == 0
    _, _, fields = parse_infotext(Image.open(tmp_path / "cached.png").info["parameters"])
    assert (fields["Cache interval"], fields["Cache branch"], fields["Cache schedule"]) == ("3", "1", "uniform")
    assert "Cache interval" not in parse_infotext(Image.open(tmp_path / "plain.png").info["parameters"])[2]
    expected = Pipeline.from_pretrained(sd1_folder)("a cat", num_inference_steps=6, seed=4, height=24, width=16,
                                                    sampler="ddim", guidance_scale=7.5, cache_interval=3,
                                                    cache_branch=1, progress=False).images[0]
    got = np.asarray(Image.open(tmp_path / "cached.png").convert("RGB"), dtype=np.int16)
    assert np.abs(got - np.asarray(expected, dtype=np.int16)).max() <= 1
    assert main([*args, "--cache-interval", "0", "-o", str(tmp_path / "bad.png")]) == 2
