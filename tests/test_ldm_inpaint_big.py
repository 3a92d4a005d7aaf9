"""The big LDM inpainting model (inpainting_big): the Pipeline against a restatement of the original
scripts/inpaint.py (batch preparation, DDIM sampling, composite) on a tiny random model saved in the original
key layout; the released YAML, detection, CLI, graph backends and bad input."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ldm_engine import Pipeline, get_preset, load_checkpoint
from ldm_engine.bench import psnr
from ldm_engine.loading import random_model
from ldm_engine.models import UNetModel, build_autoencoder

# models/ldm/inpainting_big/config.yaml of CompVis/latent-diffusion (its model section, as released)
INPAINTING_BIG_YAML = """
model:
  base_learning_rate: 1.0e-06
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    linear_start: 0.0015
    linear_end: 0.0205
    log_every_t: 100
    timesteps: 1000
    loss_type: l1
    first_stage_key: image
    cond_stage_key: masked_image
    image_size: 64
    channels: 3
    concat_mode: true
    monitor: val/loss
    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        image_size: 64
        in_channels: 7
        out_channels: 3
        model_channels: 256
        attention_resolutions: [8, 4, 2]
        num_res_blocks: 2
        channel_mult: [1, 2, 3, 4]
        num_heads: 8
        resblock_updown: true
    first_stage_config:
      target: ldm.models.autoencoder.VQModelInterface
      params:
        embed_dim: 3
        n_embed: 8192
        monitor: val/rec_loss
        ddconfig:
          attn_type: none
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
          target: ldm.modules.losses.contperceptual.DummyLoss
    cond_stage_config: __is_first_stage__
"""


def tiny_yaml() -> str:
    text = INPAINTING_BIG_YAML
    for a, b in (("model_channels: 256", "model_channels: 32"),
                 ("attention_resolutions: [8, 4, 2]", "attention_resolutions: [2]"),
                 ("channel_mult: [1, 2, 3, 4]", "channel_mult: [1, 2]"), ("n_embed: 8192", "n_embed: 64"),
                 ("ch: 128", "ch: 32"), ("ch_mult: [1, 2, 4]", "ch_mult: [1, 1, 2]"),
                 ("num_res_blocks: 2\n          attn", "num_res_blocks: 1\n          attn")):
        assert a in text, a
        text = text.replace(a, b)
    return text


def original_checkpoint(cfg, path, seed=0):
    """A random model as the original LatentDiffusion saves it: `__is_first_stage__` makes the conditioning
    stage the first stage itself, so its weights appear twice (first_stage_model.* and cond_stage_model.*)."""
    torch.manual_seed(seed)
    vq = build_autoencoder(cfg.vae)
    vq.quantize.embedding.weight.data *= 30  # a codebook that spans the latents, as a trained one (no argmin near-ties)
    sd = {"model.diffusion_model." + k: v for k, v in UNetModel(cfg.unet).state_dict().items()}
    sd |= {"first_stage_model." + k: v for k, v in vq.state_dict().items()}
    sd |= {"cond_stage_model." + k: v for k, v in vq.state_dict().items()}
    betas = torch.linspace(0.0015 ** 0.5, 0.0205 ** 0.5, 1000, dtype=torch.float64) ** 2
    sd |= {"betas": betas.float(), "alphas_cumprod": torch.cumprod(1 - betas, 0).float()}
    torch.save({"state_dict": sd, "global_step": 1}, path)
    return path


def original_ddim(apply_model, x_T, steps, betas):
    """ldm/models/diffusion/ddim.py, eta 0, restated: uniform timesteps range(0, T, T // S) + 1; alphas_prev
    starts at alphas_cumprod[0]; x_{t-1} = sqrt(a_prev) x0 + sqrt(1 - a_prev) eps."""
    alphacums = np.cumprod(1.0 - betas.numpy())
    ts = np.asarray(list(range(0, len(betas), len(betas) // steps))) + 1
    alphas = torch.tensor(alphacums[ts], dtype=torch.float32)
    alphas_prev = torch.tensor(np.asarray([alphacums[0]] + alphacums[ts[:-1]].tolist()), dtype=torch.float32)
    x = x_T
    with torch.no_grad():
        for i, step in enumerate(np.flip(ts)):
            index = len(ts) - i - 1
            e_t = apply_model(x, torch.full((x.shape[0],), int(step), dtype=torch.long))
            a_t, a_prev = alphas[index], alphas_prev[index]
            pred_x0 = (x - (1 - a_t).sqrt() * e_t) / a_t.sqrt()
            x = a_prev.sqrt() * pred_x0 + (1 - a_prev).sqrt() * e_t
    return x


def linear_betas(start, end):
    return torch.linspace(start ** 0.5, end ** 0.5, 1000, dtype=torch.float64) ** 2


def _inputs(tmp_path, h=32, w=48):
    rng = np.random.RandomState(0)
    image = (rng.rand(h, w, 3) * 255).astype(np.uint8)
    mask = np.zeros((h, w), np.uint8)
    mask[8:24, 12:30] = 255
    Image.fromarray(image).save(tmp_path / "example.png")
    Image.fromarray(mask).save(tmp_path / "example_mask.png")
    return tmp_path / "example.png", tmp_path / "example_mask.png"


def test_pipeline_is_scripts_inpaint_py(tmp_path):
    cfg = get_preset("tiny-ldm-inpaint")
    ckpt = original_checkpoint(cfg, tmp_path / "last.ckpt")
    image_path, mask_path = _inputs(tmp_path)
    sd = torch.load(ckpt, weights_only=True)["state_dict"]
    unet, vq = UNetModel(cfg.unet).eval(), build_autoencoder(cfg.vae).eval()
    unet.load_state_dict({k[22:]: v for k, v in sd.items() if k.startswith("model.diffusion_model.")})
    vq.load_state_dict({k[18:]: v for k, v in sd.items() if k.startswith("first_stage_model.")})

    # make_batch
    image = np.array(Image.open(image_path).convert("RGB")).astype(np.float32) / 255.0
    image = torch.from_numpy(image[None].transpose(0, 3, 1, 2))
    mask = np.array(Image.open(mask_path).convert("L")).astype(np.float32) / 255.0
    mask = mask[None, None]
    mask[mask < 0.5] = 0
    mask[mask >= 0.5] = 1
    mask = torch.from_numpy(mask)
    batch = {"image": image, "mask": mask, "masked_image": (1 - mask) * image}
    batch = {k: v * 2.0 - 1.0 for k, v in batch.items()}
    # encode masked image and concat downsampled mask (cond_stage_model is the first stage: VQModelInterface.encode)
    with torch.no_grad():
        c = vq.quant_conv(vq.encoder(batch["masked_image"]))
    cc = F.interpolate(batch["mask"], size=c.shape[-2:])
    c = torch.cat((c, cc), dim=1)
    x_T = torch.randn((1, c.shape[1] - 1, *c.shape[2:]), generator=torch.Generator().manual_seed(5))
    steps = 5  # a divisor of 1000 (the script's 50 is one): range(0, 1000, 1000 // S) then has S entries
    samples = original_ddim(lambda x, t: unet(torch.cat([x, c], dim=1), t), x_T, steps, linear_betas(0.0015, 0.0205))
    with torch.no_grad():
        x_samples = vq.decode(samples)  # decode_first_stage: scale factor 1, through the codebook
    image01 = torch.clamp((batch["image"] + 1.0) / 2.0, min=0.0, max=1.0)
    mask01 = torch.clamp((batch["mask"] + 1.0) / 2.0, min=0.0, max=1.0)
    predicted = torch.clamp((x_samples + 1.0) / 2.0, min=0.0, max=1.0)
    inpainted = (1 - mask01) * image01 + mask01 * predicted
    expected = (inpainted.numpy().transpose(0, 2, 3, 1)[0] * 255).astype(np.uint8)

    model = load_checkpoint(ckpt)  # detected from the keys; the cond_stage_model.* copy is ignored
    assert model.config.task == "inpaint" and model.config.vae.attn_type == "none"
    assert model.config.unet == cfg.unet and model.config.vae == cfg.vae
    pipe = Pipeline(model)
    out = pipe(image=str(image_path), mask_image=str(mask_path), num_inference_steps=steps, latents=x_T,
               progress=False).images[0]
    got = np.asarray(out).astype(np.int16)
    assert np.abs(got - expected).max() <= 2  # the script truncates to uint8, the Pipeline rounds
    keep = np.asarray(Image.open(mask_path)) < 128
    assert (got[keep] == np.asarray(Image.open(image_path))[keep]).all()  # the original outside the mask
    assert np.abs(got - expected)[~keep].mean() < 1.0 and np.ptp(expected[~keep]) > 50


def test_yaml_and_released_config(tmp_path):
    from ldm_engine.loading.yaml_config import config_from_yaml

    (tmp_path / "config.yaml").write_text(INPAINTING_BIG_YAML)
    cfg, preset = config_from_yaml(tmp_path / "config.yaml"), get_preset("ldm-inpaint-big")
    assert (cfg.unet, cfg.vae, cfg.schedule, cfg.task, cfg.scale_factor) == (
        preset.unet, preset.vae, preset.schedule, preset.task, preset.scale_factor)
    assert cfg.vae.attn_type == "none" and cfg.unet.resblock_updown
    (tmp_path / "tiny.yaml").write_text(tiny_yaml())
    ckpt = original_checkpoint(get_preset("tiny-ldm-inpaint"), tmp_path / "m.ckpt")
    model = load_checkpoint(ckpt, config=str(tmp_path / "tiny.yaml"))
    assert model.config.unet == get_preset("tiny-ldm-inpaint").unet and model.config.task == "inpaint"
    with torch.device("meta"):  # the released sizes build, and the VQ has no attention weights at all
        vq = build_autoencoder(preset.vae)
    assert not any(".attn" in k for k in vq.state_dict())


def _kw(h=16, w=24):
    g = torch.Generator().manual_seed(2)
    image = torch.rand(1, 3, h, w, generator=g) * 2 - 1
    mask = torch.zeros(1, 1, h, w)
    mask[..., 4:12, 8:20] = 1
    return dict(image=image, mask_image=mask, num_inference_steps=3, seed=4, output_type="np", progress=False)


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_graph_backends_match_torch(backend):
    pytest.importorskip(backend)
    model = random_model("tiny-ldm-inpaint", seed=1)
    ref = Pipeline(model, "torch")(**_kw()).images
    out = Pipeline(model, backend, dtype=torch.float32, progress=False)(**_kw()).images
    assert np.isfinite(out).all() and psnr(ref, out) >= 40


def test_cli(tmp_path):
    from ldm_engine.cli import main

    ckpt = original_checkpoint(get_preset("tiny-ldm-inpaint"), tmp_path / "inpainting_big.ckpt")
    image_path, mask_path = _inputs(tmp_path, 16, 24)
    out = tmp_path / "out.png"
    assert main(["--model", str(ckpt), "--image", str(image_path), "--mask", str(mask_path), "--steps", "2",
                 "--seed", "1", "-o", str(out)]) == 0
    got = np.asarray(Image.open(out))
    keep = np.asarray(Image.open(mask_path)) < 128
    assert got.shape == (16, 24, 3) and (got[keep] == np.asarray(Image.open(image_path))[keep]).all()


def test_defaults_strength_and_bad_input():
    pipe = Pipeline(random_model("tiny-ldm-inpaint"))
    kw = _kw()
    full = pipe(**kw).images
    assert pipe(**kw, strength=1.0).images.tobytes() == full.tobytes()  # the default: from pure noise, as the script
    partial = pipe(**kw, strength=0.5).images  # SDEdit from the image's own latent
    assert not np.allclose(partial, full)
    image, mask = kw.pop("image"), kw.pop("mask_image")
    cases = [
        (dict(image=image), "inpainting model: pass image and mask_image"),
        (dict(image=image, mask_image=torch.zeros(1, 1, 8, 8)), "mask size"),
        (dict(image=image.clone().fill_(float("nan")), mask_image=mask), "NaN"),
        (dict(image=torch.rand(1, 1, 16, 24), mask_image=mask), r"\(3, H, W\)"),
        (dict(image=image, mask_image=mask, masked_content="fill"), "masked_content='fill' does not apply"),
        (dict(image=image, mask_image=mask, label_map=np.zeros((16, 24), int)), "takes no label_map"),
        (dict(image=image, mask_image=mask, tile=(3, 1)), "multiple of 2"),
    ]
    for extra, message in cases:
        with pytest.raises(ValueError, match=message):
            pipe(**kw, **extra)
    tiled = pipe(**_kw(), tile=(4, 2)).images  # patches work here too
    assert tiled.shape == full.shape and np.isfinite(tiled).all()
