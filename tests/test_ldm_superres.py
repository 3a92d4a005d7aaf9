"""LDM super-resolution (bsr_sr): parity with diffusers' LDMSuperResolutionPipeline, the original single file,
YAML and detection, patch sampling against a restatement of the original's split_input_params (and its seam
error), the CLI, the graph backends and bad input."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ldm_engine import Pipeline, get_preset, load_checkpoint
from ldm_engine.bench import psnr
from ldm_engine.conditioning import patches
from ldm_engine.loading import random_model
from ldm_engine.models import UNetModel, build_autoencoder

# models/ldm/bsr_sr/config.yaml of CompVis/latent-diffusion (its model section, as released)
BSR_SR_YAML = """
model:
  base_learning_rate: 1.0e-06
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    linear_start: 0.0015
    linear_end: 0.0155
    log_every_t: 100
    timesteps: 1000
    loss_type: l2
    first_stage_key: image
    cond_stage_key: LR_image
    image_size: 64
    channels: 3
    concat_mode: true
    cond_stage_trainable: false
    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        image_size: 64
        in_channels: 6
        out_channels: 3
        model_channels: 160
        attention_resolutions: [16, 8]
        num_res_blocks: 2
        channel_mult: [1, 2, 2, 4]
        num_head_channels: 32
    first_stage_config:
      target: ldm.models.autoencoder.VQModelInterface
      params:
        embed_dim: 3
        n_embed: 8192
        monitor: val/rec_loss
        ddconfig:
          double_z: false
          z_channels: 3
          resolution: 256
          in_channels: 3
          out_ch: 3
          ch: 128
          ch_mult: [1, 2, 4]
          num_res_blocks: 2
          attn_resolutions: []
          dropout: 0.0
        lossconfig:
          target: torch.nn.Identity
    cond_stage_config:
      target: torch.nn.Identity
"""


def tiny_yaml(text: str) -> str:
    """The released config shrunk to the tiny preset's sizes."""
    for a, b in (("model_channels: 160", "model_channels: 32"), ("channel_mult: [1, 2, 2, 4]", "channel_mult: [1, 2]"),
                 ("attention_resolutions: [16, 8]", "attention_resolutions: [2]"),
                 ("n_embed: 8192", "n_embed: 64"),
                 ("ch: 128", "ch: 32"), ("ch_mult: [1, 2, 4]", "ch_mult: [1, 1, 2]"),
                 ("num_res_blocks: 2\n          attn", "num_res_blocks: 1\n          attn"),
                 ("image_size: 64\n    channels", "image_size: 8\n    channels")):
        assert a in text, a
        text = text.replace(a, b)
    return text


def original_state_dict(cfg, seed=0, extra=None) -> dict:
    """A random model in the original LatentDiffusion key layout, with the DDPM buffers the originals carry."""
    torch.manual_seed(seed)
    sd = {"model.diffusion_model." + k: v for k, v in UNetModel(cfg.unet).state_dict().items()}
    sd |= {"first_stage_model." + k: v for k, v in build_autoencoder(cfg.vae).state_dict().items()}
    s = cfg.schedule
    betas = torch.linspace(s.beta_start ** 0.5, s.beta_end ** 0.5, 1000, dtype=torch.float64) ** 2
    sd |= {"betas": betas.float(), "alphas_cumprod": torch.cumprod(1 - betas, 0).float()}
    return sd | (extra or {})


@pytest.fixture(scope="module")
def sr_folder(tmp_path_factory):
    """A diffusers LDMSuperResolutionPipeline: tiny random VQModel (f4) + UNet2DModel, saved by diffusers."""
    from diffusers import DDIMScheduler, LDMSuperResolutionPipeline, UNet2DModel, VQModel

    torch.manual_seed(0)
    vq = VQModel(block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=8, latent_channels=3,
                 num_vq_embeddings=64, down_block_types=("DownEncoderBlock2D",) * 3,
                 up_block_types=("UpDecoderBlock2D",) * 3).eval()
    # a trained codebook spans the latents; the default init (+-1/64) puts every latent almost equally far from
    # all codes, where float rounding alone (cdist vs the original's expanded distance) flips the argmin
    vq.quantize.embedding.weight.data = torch.randn(64, 3, generator=torch.Generator().manual_seed(0)) * 10
    unet = UNet2DModel(sample_size=8, in_channels=6, out_channels=3, block_out_channels=(32, 64), layers_per_block=2,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=8, norm_num_groups=8).eval()
    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.0015, beta_end=0.0155, clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    root = tmp_path_factory.mktemp("ldm_sr")
    LDMSuperResolutionPipeline(vqvae=vq, unet=unet, scheduler=sched).save_pretrained(root)
    return root


def _low_res(h=32, w=32, seed=0) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (h, w, 3), dtype=np.uint8))


def test_unet2d_and_vq_modules_match_diffusers(sr_folder):
    from diffusers import UNet2DModel, VQModel

    model = load_checkpoint(sr_folder)
    assert model.config.task == "superres" and model.config.scale_factor == 1.0
    unet = UNet2DModel.from_pretrained(sr_folder / "unet").eval()
    vq = VQModel.from_pretrained(sr_folder / "vqvae").eval()
    x = torch.randn(2, 6, 16, 24, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for t in (torch.tensor([3, 700]), 500):
            assert (unet(x, t).sample - model.unet(x, t)).abs().max() <= 1e-4
        img = torch.rand(1, 3, 32, 48) * 2 - 1
        assert (vq.encode(img).latents - model.vae.encode(img).mode()).abs().max() <= 1e-4
        z = torch.randn(1, 3, 8, 12) * 10
        assert (vq.decode(z).sample - model.vae.decode(z)).abs().max() <= 1e-4  # through the codebook
        assert (vq.decode(z, force_not_quantize=True).sample - model.vae.decode(z, True)).abs().max() <= 1e-4


def test_pipeline_matches_diffusers(sr_folder):
    """Same seed, DDIM with eta 1, <= 2/255. diffusers' pipeline draws its start noise from `generator` but
    does not pass it to the scheduler step, whose eta noise comes from torch's global generator: here the
    start latents are given and `generator` is seeded as the global one was."""
    from diffusers import LDMSuperResolutionPipeline

    pipe = LDMSuperResolutionPipeline.from_pretrained(sr_folder)
    pipe.set_progress_bar_config(disable=True)
    low = _low_res()
    torch.manual_seed(7)
    ref = pipe(image=low, num_inference_steps=5, eta=1.0, generator=torch.Generator().manual_seed(3),
               output_type="np").images
    ours = Pipeline.from_pretrained(sr_folder)
    start = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    out = ours(image=low, num_inference_steps=5, eta=1.0, latents=start, generator=torch.Generator().manual_seed(7),
               output_type="np", progress=False).images
    assert out.shape == ref.shape == (1, 128, 128, 3)
    assert np.abs(out - ref).max() <= 2 / 255
    again = ours(image=low, num_inference_steps=5, eta=1.0, seed=3, output_type="np", progress=False).images
    np.testing.assert_array_equal(again, ours(image=low, num_inference_steps=5, eta=1.0, seed=3, output_type="np",
                                              progress=False).images)


def test_original_single_file_yaml_and_detection(tmp_path):
    cfg = get_preset("tiny-ldm-superres")
    ckpt = tmp_path / "bsr_sr.ckpt"
    torch.save({"state_dict": original_state_dict(cfg), "global_step": 3}, ckpt)  # read with weights_only
    detected = load_checkpoint(ckpt)
    assert detected.config.task == "superres" and detected.config.conditioning == "none"
    assert detected.config.unet == cfg.unet and detected.config.vae == cfg.vae
    s = detected.config.schedule
    assert (s.beta_start, s.beta_end) == (0.0015, 0.0155)  # read off the file's betas
    yaml_path = tmp_path / "bsr_sr.yaml"
    yaml_path.write_text(tiny_yaml(BSR_SR_YAML))
    from_yaml = load_checkpoint(ckpt, config=str(yaml_path))
    assert from_yaml.config.unet == cfg.unet and from_yaml.config.vae == cfg.vae
    assert from_yaml.config.task == "superres" and from_yaml.config.scale_factor == 1.0
    low = torch.rand(1, 3, 16, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    a, b = (Pipeline(m)(image=low, num_inference_steps=3, seed=2, output_type="np", progress=False).images
            for m in (detected, from_yaml))
    assert a.shape == (1, 64, 32, 3)
    np.testing.assert_array_equal(a, b)


def test_released_yaml_is_the_preset(tmp_path):
    from ldm_engine.loading.yaml_config import config_from_yaml

    (tmp_path / "config.yaml").write_text(BSR_SR_YAML)
    cfg, preset = config_from_yaml(tmp_path / "config.yaml"), get_preset("ldm-superres-4x")
    assert (cfg.unet, cfg.vae, cfg.schedule, cfg.task, cfg.scale_factor) == (
        preset.unet, preset.vae, preset.schedule, preset.task, preset.scale_factor)


# ---- patches: the original's split_input_params restated ------------------------------------------

def original_fold_apply(fn, x, ks, stride, uf=1):
    """ddpm.py's get_fold_unfold + apply_model / decode_first_stage loop, restated: unfold into ks patches at
    `stride`, run fn on each, weight by the clipped delta_border, fold (x uf) and divide by the folded weights."""
    h, w = x.shape[-2:]
    ly, lx = (h - ks) // stride + 1, (w - ks) // stride + 1

    def delta_border(hh, ww):
        arr = torch.stack(torch.meshgrid(torch.arange(hh), torch.arange(ww), indexing="ij"), -1) / torch.tensor(
            [hh - 1, ww - 1]).view(1, 1, 2)
        d_lu = torch.min(arr, dim=-1, keepdim=True)[0]
        d_rd = torch.min(1 - arr, dim=-1, keepdim=True)[0]
        return torch.min(torch.cat([d_lu, d_rd], dim=-1), dim=-1)[0]

    weighting = torch.clip(delta_border(ks * uf, ks * uf), 0.01, 0.5).view(1, (ks * uf) ** 2, 1).repeat(1, 1, ly * lx)
    unfold = torch.nn.Unfold(kernel_size=ks, dilation=1, padding=0, stride=stride)
    fold = torch.nn.Fold(output_size=(h * uf, w * uf), kernel_size=ks * uf, dilation=1, padding=0, stride=stride * uf)
    normalization = fold(weighting).view(1, 1, h * uf, w * uf)
    weighting = weighting.view(1, 1, ks * uf, ks * uf, ly * lx)
    z = unfold(x).view(x.shape[0], -1, ks, ks, ly * lx)
    o = torch.stack([fn(z[..., i]) for i in range(z.shape[-1])], dim=-1) * weighting
    return fold(o.view(o.shape[0], -1, o.shape[-1])) / normalization


def _nonlinear(p):
    """A stand-in model whose output depends on the whole patch (like GroupNorm statistics)."""
    return torch.tanh(p * 1.7 - p.mean()) + p.std()


@pytest.mark.parametrize("size,ks,stride", [((40, 24), 16, 8), ((48, 48), 16, 16), ((32, 40), 8, 4)])
def test_patch_blend_is_the_original_fold(size, ks, stride):
    x = torch.randn(2, 5, *size, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(patches.blend(_nonlinear, x, ks, stride), original_fold_apply(_nonlinear, x, ks, stride),
                               atol=1e-5, rtol=1e-5)
    up = lambda p: F.interpolate(_nonlinear(p[:, :3]), scale_factor=4.0, mode="nearest")  # noqa: E731 a "decoder"
    torch.testing.assert_close(patches.blend(up, x, ks, stride, factor=4), original_fold_apply(up, x, ks, stride, uf=4),
                               atol=1e-5, rtol=1e-5)


def test_patches_cover_any_size_and_blend_exactly():
    for size, side, stride in ((37, 16, 8), (16, 16, 8), (9, 16, 4), (50, 16, 16)):
        pos = patches.positions(size, min(side, size), stride)
        covered = torch.zeros(size)
        for p in pos:
            covered[p:p + min(side, size)] = 1
        assert covered.all() and pos[-1] + min(side, size) == size
    x = torch.randn(1, 3, 37, 29)
    torch.testing.assert_close(patches.blend(lambda p: 2 * p, x, 16, 8), 2 * x)  # a pointwise model: no seams at all


def test_seam_error_of_patch_sampling():
    """Patch sampling vs convolutional sampling of one low-res image (patches of 16 latent pixels at stride
    8). The seam error, measured:
    - the blend alone, one call of a local 2-layer conv denoiser (receptive field 5x5, zero padding): max
      |patches - whole| 0.17, mean 7.2e-3, on outputs of std 0.31 — patch pixels next to an inner patch edge
      still carry weight 1/15 and see padding there; with 128-pixel patches on this 32x48 latent (one
      patch) the two agree to 6e-8;
    - whole sampling (10 DDIM steps, eta 1) with the tiny random super-resolution model: 18.1 dB PSNR between
      the two images, mean error 24.2/255 in 8-pixel bands on the seams vs 23.2/255 inside the patches. They
      differ everywhere, not at the seams: each patch has its own GroupNorm statistics and attention span."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(6, 8, 3, padding=1), torch.nn.Tanh(), torch.nn.Conv2d(8, 3, 3, padding=1))
    x = torch.randn(1, 6, 32, 48)
    with torch.no_grad():
        whole, tiled = net(x), patches.blend(net, x, 16, 8)
    err = (whole - tiled).abs()
    assert err.max() < 0.2 and err.mean() < 0.01 and whole.std() > 0.25

    pipe = Pipeline(random_model("tiny-ldm-superres", seed=0))
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 32), torch.linspace(0, 1, 48), indexing="ij")
    low = torch.stack([torch.sin(6 * xx), torch.cos(5 * yy), torch.sin(4 * (xx + yy))])[None] * 0.8
    kw = dict(image=low, num_inference_steps=10, eta=1.0, seed=1, output_type="np", progress=False)
    a, b = pipe(**kw).images[0], pipe(**kw, tile=(16, 8)).images[0]
    diff = np.abs(a - b).mean(-1)
    band = np.zeros(diff.shape, bool)  # 8-pixel bands on the patch borders (latent x 4 = pixels)
    for i in patches.positions(32, 16, 8)[1:]:
        band[i * 4 - 4:i * 4 + 4] = band[(i + 16) * 4 - 4:(i + 16) * 4 + 4] = True
    for j in patches.positions(48, 16, 8)[1:]:
        band[:, j * 4 - 4:j * 4 + 4] = True
    assert psnr(a, b) > 15 and diff[band].mean() < 1.2 * diff[~band].mean()
    same = pipe(**kw, tile=True).images[0]  # one 128-pixel patch covers this 32x48 latent: convolutional
    np.testing.assert_array_equal(same, a)


def test_native_loop_matches_python_loop():
    """The C++ DDIM loop (eta 1: fresh noise every step) on the concatenated input, whole and in patches."""
    model = random_model("tiny-ldm-superres", seed=1)
    low = torch.rand(1, 3, 16, 24, generator=torch.Generator().manual_seed(2)) * 2 - 1
    kw = dict(image=low, num_inference_steps=4, eta=1.0, seed=6, output_type="latent", progress=False)
    for tile in (False, (8, 4)):
        a, b = (Pipeline(model, scheduler=s)(**kw, tile=tile).latents for s in ("cpp", "python"))
        assert (a - b).abs().max() <= 1e-6


# ---- CLI, backends, bad input ----------------------------------------------------------------------

def test_cli_upscales_with_tile_and_records_it(tmp_path):
    from safetensors.torch import save_file

    from ldm_engine.cli import main
    from ldm_engine.infotext import parse_infotext

    model = tmp_path / "sr.safetensors"
    save_file(original_state_dict(get_preset("tiny-ldm-superres")), str(model))
    _low_res(16, 24).save(tmp_path / "low.png")
    out = tmp_path / "x4.png"
    assert main(["--model", str(model), "--image", str(tmp_path / "low.png"), "--steps", "2", "--eta", "1",
                 "--seed", "4", "--tile", "4,2", "-o", str(out)]) == 0
    image = Image.open(out)
    assert image.size == (96, 64)
    fields = parse_infotext(image.text["parameters"])[2]
    assert fields["Tile"] == "4,2" and fields["Eta"] == "1.0" and image.text["Tile"] == "4,2"


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_graph_backends_match_torch(backend):
    pytest.importorskip(backend)
    model = random_model("tiny-ldm-superres", seed=3)
    low = torch.rand(1, 3, 16, 24, generator=torch.Generator().manual_seed(1)) * 2 - 1
    kw = dict(image=low, num_inference_steps=3, eta=1.0, seed=5, output_type="np", progress=False)
    for tile in (False, (8, 4)):
        ref = Pipeline(model, "torch")(**kw, tile=tile).images
        out = Pipeline(model, backend, dtype=torch.float32, progress=False)(**kw, tile=tile).images
        assert np.isfinite(out).all() and psnr(ref, out) >= 40


def test_bad_input():
    pipe = Pipeline(random_model("tiny-ldm-superres"))
    low = torch.rand(1, 3, 8, 8) * 2 - 1
    run = dict(num_inference_steps=1, progress=False)
    cases = [
        (dict(), "super-resolution model: pass image"),
        (dict(image=torch.rand(1, 4, 8, 8)), r"\(3, H, W\) or \(1, 3, H, W\) tensor"),
        (dict(image=torch.full((1, 3, 8, 8), float("nan"))), "NaN"),
        (dict(image=torch.rand(1, 3, 8, 8) * 255), r"values must be in \[-1, 1\]"),
        (dict(image=torch.rand(2, 3, 8, 8)), "holds 2 images"),
        (dict(image=low, height=16, width=16), "is 8x8 .* but 16x16 was asked"),
        (dict(image=torch.rand(1, 3, 7, 8)), "height must be a multiple of 2"),
        (dict(image=np.zeros((8, 8, 3), np.float32)), "must be uint8"),
        (dict(image=low, mask_image=Image.new("L", (8, 8))), "takes image only"),
        (dict(image=low, label_map=np.zeros((8, 8), int)), "takes image only"),
        (dict(image=low, tile=(3, 2)), "multiple of 2"),
        (dict(image=low, tile=(8, 9)), "stride must be in"),
        (dict(image=low, tile="yes"), "tile must be False"),
        (dict(image=low, prompt="a cat"), "takes no prompt"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            pipe(**run, **kwargs)
    with pytest.raises(ValueError, match="tile applies to the models conditioned by concatenation"):
        Pipeline(random_model("tiny-ldm-vq"))(tile=True, **run)
