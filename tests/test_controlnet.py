"""ControlNet parity with diffusers: the module's residuals (diffusers folder and original single files),
the UNet with residuals, and whole images from diffusers' ControlNet pipelines (txt2img, img2img,
inpainting, several ControlNets, guess mode, guidance start/end), with the same tiny weights and seed."""
import numpy as np
import pytest
import torch
from PIL import Image

from ldm_engine import Pipeline
from ldm_engine.control import read_controlnet

TOL = 2 / 255


def assert_close(got, expected, tol, what: str):
    err = float(np.abs(np.asarray(got) - np.asarray(expected)).max())
    print(f"{what}: max abs difference {err:.3g} (tolerance {tol:.3g})")
    assert err <= tol, (what, err)


def make_controlnet(folder, out, seed: int):
    """A diffusers ControlNetModel copied from the folder's UNet, its zero-initialised convs randomized
    (so a wrong key map or a missing residual changes the output), saved with save_pretrained."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    if unet.config.in_channels != 4:  # an inpainting UNet's ControlNet reads the plain 4-channel latents
        unet = UNet2DConditionModel.from_config({**unet.config, "in_channels": 4})
    cn = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32))  # hint /2 as the tiny VAE
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in cn.named_parameters():
            if name.startswith(("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    cn.eval().save_pretrained(out)
    return cn


def original_files(folder, unet_cfg, out):
    """The same ControlNet in the original key layout: `control_model.*` safetensors and bare-key .pth."""
    from safetensors.torch import save_file

    sd = read_controlnet(folder, unet_cfg).state_dict()
    save_file({"control_model." + k: v.contiguous() for k, v in sd.items()}, out / "cn_prefixed.safetensors")
    torch.save({k: v.clone() for k, v in sd.items()}, out / "cn_bare.pth")
    return out / "cn_prefixed.safetensors", out / "cn_bare.pth"


@pytest.fixture(scope="module")
def nets(sd1_folder, sd2_folder, tmp_path_factory):
    root = tmp_path_factory.mktemp("controlnets")
    out = {}
    for style, folder in (("sd1", sd1_folder), ("sd2", sd2_folder)):
        out[style] = make_controlnet(folder, root / style, seed=7), root / style
    out["sd1b"] = make_controlnet(sd1_folder, root / "sd1b", seed=8), root / "sd1b"
    return out


@pytest.fixture(scope="module")
def pipes(sd1_folder, sd2_folder, inpaint_folder):
    return {"sd1": Pipeline.from_pretrained(sd1_folder), "sd2": Pipeline.from_pretrained(sd2_folder),
            "inpaint": Pipeline.from_pretrained(inpaint_folder)}


def _hint(seed: int, w: int = 24, h: int = 16) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("style", ["sd1", "sd2"])
def test_residuals_match_diffusers(nets, pipes, style, tmp_path):
    cn, folder = nets[style]
    unet_cfg = pipes[style].config.unet
    x, hint = torch.randn(2, 4, 8, 12), torch.rand(2, 3, 16, 24)
    ctx, t = torch.randn(2, 7, 32), torch.tensor([500, 20])
    with torch.no_grad():
        down, mid = cn(x, t, ctx, hint, conditioning_scale=0.7, return_dict=False)
    expected = list(down) + [mid]
    for source in (folder, *original_files(folder, unet_cfg, tmp_path)):
        with torch.no_grad():
            got = read_controlnet(source, unet_cfg)(x, hint, t, ctx, scale=0.7)
        assert len(got) == len(expected) == 7
        err = max((a - b).abs().max().item() for a, b in zip(got, expected))
        assert_close(err, 0.0, 1e-4, f"{style} residuals from {source.name}")
        assert min(e.abs().max().item() for e in expected) > 1e-2  # the residuals are not trivially zero


def test_unet_adds_residuals_like_diffusers(pipes, sd1_folder):
    from diffusers import UNet2DConditionModel

    ref = UNet2DConditionModel.from_pretrained(sd1_folder / "unet").eval()
    ours = pipes["sd1"].model.unet
    x, ctx = torch.randn(2, 4, 8, 12), torch.randn(2, 7, 32)
    with torch.no_grad():
        shapes = [h.shape for h in _skips(ours, x, ctx)]
        res = [torch.randn(s) for s in shapes]
        expected = ref(x, 300, ctx, down_block_additional_residuals=res[:-1],
                       mid_block_additional_residual=res[-1]).sample
        got = ours(x, 300, ctx, control=res)
        plain = ours(x, 300, ctx)
    assert_close(got, expected, 1e-4, "UNet with residuals")
    assert (got - plain).abs().max() > 1e-2


def _skips(unet, x, ctx):
    """The UNet's skip tensors and its middle-block output (the shapes a ControlNet must produce)."""
    from ldm_engine.models.unet import embed_time

    emb, h, out = embed_time(unet, x, 300), x, []
    for block in unet.input_blocks:
        h = block(h, emb, ctx)
        out.append(h)
    return out + [unet.middle_block(h, emb, ctx)]


def _ref(kind, folder, controlnet, sampler="ddim"):
    import diffusers

    base = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    cls = {"txt2img": diffusers.StableDiffusionControlNetPipeline,
           "img2img": diffusers.StableDiffusionControlNetImg2ImgPipeline,
           "inpaint": diffusers.StableDiffusionControlNetInpaintPipeline}[kind]
    comps = {k: v for k, v in base.components.items() if k != "image_encoder"}
    ref = cls(**comps, controlnet=controlnet)
    if sampler == "euler":
        ref.scheduler = diffusers.EulerDiscreteScheduler.from_config(ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    return ref


def _ours(pipe, *paths):
    pipe.unload_controlnets()
    for p in paths:
        pipe.load_controlnet(p)
    return pipe


@pytest.mark.parametrize("style,sampler", [("sd1", "ddim"), ("sd2", "ddim"), ("sd1", "euler")])
def test_txt2img_matches_diffusers(nets, pipes, sd1_folder, sd2_folder, style, sampler):
    cn, folder = nets[style]
    ref = _ref("txt2img", sd1_folder if style == "sd1" else sd2_folder, cn, sampler)
    kw = dict(num_inference_steps=5, guidance_scale=6.0, height=16, width=24, output_type="np",
              controlnet_conditioning_scale=0.8)
    image = _hint(1, 48, 32)  # twice the output size: resized by the same rule
    expected = ref(["a red circle", "a cat"], image=image, generator=torch.Generator().manual_seed(3), **kw).images
    got = _ours(pipes[style], folder)(["a red circle", "a cat"], control_image=image, seed=3, sampler=sampler,
                                      progress=False, **kw).images
    assert got.shape == expected.shape == (2, 16, 24, 3)
    assert_close(got, expected, TOL, f"txt2img {style} {sampler}")
    pipes[style].unload_controlnets()
    without = pipes[style](["a red circle", "a cat"], seed=3, sampler=sampler, progress=False,
                           **{k: v for k, v in kw.items() if k != "controlnet_conditioning_scale"}).images
    assert np.abs(without - got).max() > 4 / 255  # the control changed the image


def test_img2img_matches_diffusers(nets, pipes, sd1_folder):
    cn, folder = nets["sd1"]
    ref = _ref("img2img", sd1_folder, cn)
    init = _hint(5)
    kw = dict(num_inference_steps=8, strength=0.6, guidance_scale=5.0, output_type="np", controlnet_conditioning_scale=0.9)
    expected = ref("a red circle", image=init, control_image=_hint(2), generator=torch.Generator().manual_seed(4),
                   **kw).images
    got = _ours(pipes["sd1"], folder)("a red circle", image=init, control_image=_hint(2), seed=4, progress=False,
                                      **kw).images
    assert_close(got, expected, TOL, "img2img")


@pytest.mark.parametrize("model", ["inpaint", "sd1"])  # 9-channel UNet / latent blending
def test_inpaint_matches_diffusers(nets, pipes, sd1_folder, inpaint_folder, model):
    cn, folder = nets["sd1"]
    ref = _ref("inpaint", inpaint_folder if model == "inpaint" else sd1_folder, cn)
    mask = np.zeros((16, 24), dtype=np.uint8)
    mask[4:12, 6:18] = 255
    kw = dict(num_inference_steps=6, guidance_scale=5.0, output_type="np", strength=1.0, controlnet_conditioning_scale=0.7)
    args = dict(image=_hint(6), mask_image=Image.fromarray(mask), control_image=_hint(2))
    expected = ref("a red circle", generator=torch.Generator().manual_seed(5), **args, **kw).images
    got = _ours(pipes[model], folder)("a red circle", seed=5, progress=False, **args, **kw).images
    assert_close(got, expected, TOL, f"inpaint {model}")


@pytest.mark.parametrize("case", ["two", "guess", "start_end"])
def test_multi_guess_and_range_match_diffusers(nets, pipes, sd1_folder, case):
    from diffusers.models.controlnets import MultiControlNetModel

    (cn_a, fa), (cn_b, fb) = nets["sd1"], nets["sd1b"]
    kw = dict(num_inference_steps=6, guidance_scale=6.0, height=16, width=24, output_type="np")
    if case == "two":
        controlnet, paths, images = MultiControlNetModel([cn_a, cn_b]), [fa, fb], [_hint(1), _hint(2)]
        kw |= dict(num_images_per_prompt=2, controlnet_conditioning_scale=[0.6, 1.3], control_guidance_start=[0.0, 0.3],
                   control_guidance_end=[0.7, 1.0])
    elif case == "guess":
        controlnet, paths, images = cn_a, [fa], _hint(1)
        kw |= dict(guess_mode=True, controlnet_conditioning_scale=1.5)
    else:
        controlnet, paths, images = cn_a, [fa], _hint(1)
        kw |= dict(control_guidance_start=0.2, control_guidance_end=0.6)
    ref = _ref("txt2img", sd1_folder, controlnet)
    expected = ref("a red circle", image=images, generator=torch.Generator().manual_seed(9), **kw).images
    got = _ours(pipes["sd1"], *paths)("a red circle", control_image=images, seed=9, progress=False, **kw).images
    assert_close(got, expected, TOL, case)


def test_bfloat16_stays_close_to_float32(nets, sd1_folder):
    """The ControlNet runs in the backend's dtype; bf16 images within 30 dB PSNR of fp32, no NaN."""
    _, folder = nets["sd1"]
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        pipe = Pipeline.from_pretrained(sd1_folder, dtype=dtype)
        pipe.load_controlnet(folder)
        assert next(pipe.control.loaded[0].module.parameters()).dtype == dtype
        out[dtype] = pipe("a red circle", control_image=_hint(1), num_inference_steps=4, height=16, width=24, seed=1,
                          output_type="np", progress=False).images
    mse = float(((out[torch.float32] - out[torch.bfloat16]) ** 2).mean())
    psnr = 10 * np.log10(1 / max(mse, 1e-12))
    print(f"bf16 vs fp32 PSNR {psnr:.1f} dB")
    assert np.isfinite(out[torch.bfloat16]).all() and psnr >= 30
