"""Semantic synthesis (semantic_synthesis256/512): the SpatialRescaler against the original's torch ops, the
Pipeline against a restatement of the original sampling on a tiny random model saved in the original key
layout, label-map inputs and their errors, convolutional sampling beyond the training size, released YAMLs,
detection, CLI and graph backends."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from ldm_engine import Pipeline, get_preset, load_checkpoint
from ldm_engine.bench import psnr
from ldm_engine.loading import random_model
from ldm_engine.models import UNetModel, build_autoencoder
from ldm_engine.models.configs import SpatialRescalerConfig
from ldm_engine.models.spatial_rescaler import SpatialRescaler
from test_ldm_inpaint_big import linear_betas, original_ddim

# models/ldm/semantic_synthesis256/config.yaml of CompVis/latent-diffusion (its model section, as released;
# semantic_synthesis512 differs only in image_size: 128)
SEMANTIC_YAML = """
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
    cond_stage_key: segmentation
    image_size: 64
    channels: 3
    concat_mode: true
    cond_stage_trainable: true
    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        image_size: 64
        in_channels: 6
        out_channels: 3
        model_channels: 128
        attention_resolutions: [32, 16, 8]
        num_res_blocks: 2
        channel_mult: [1, 4, 8]
        num_heads: 8
    first_stage_config:
      target: ldm.models.autoencoder.VQModelInterface
      params:
        embed_dim: 3
        n_embed: 8192
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
      target: ldm.modules.encoders.modules.SpatialRescaler
      params:
        n_stages: 2
        in_channels: 182
        out_channels: 3
"""
CLASSES = 6  # the tiny preset's label classes


def original_rescaler(x, weight, n_stages=2, multiplier=0.5, method="bilinear"):
    """SpatialRescaler.forward of ldm/modules/encoders/modules.py restated with torch ops."""
    for _ in range(n_stages):
        x = F.interpolate(x, scale_factor=multiplier, mode=method)
    return F.conv2d(x, weight)  # channel_mapper: 1x1, bias=False


def one_hot(seg: np.ndarray, n: int) -> torch.Tensor:
    """The original datasets' one-hot map (np.eye(n_labels)[segmentation]), 'b h w c -> b c h w' as get_input."""
    return torch.from_numpy(np.eye(n, dtype=np.float32)[seg])[None].permute(0, 3, 1, 2).contiguous()


def labels(h=32, w=48, seed=0, n=CLASSES) -> np.ndarray:
    """A label map of a few regions, as segmentations are (not per-pixel noise)."""
    rng = np.random.RandomState(seed)
    seg = np.zeros((h, w), np.int64)
    for _ in range(8):
        y, x = rng.randint(0, h), rng.randint(0, w)
        seg[y:y + rng.randint(4, h), x:x + rng.randint(4, w)] = rng.randint(0, n)
    return seg


def save_original(path, cfg, seed=0):
    torch.manual_seed(seed)
    vq = build_autoencoder(cfg.vae)
    vq.quantize.embedding.weight.data *= 30  # a codebook that spans the latents, as a trained one
    sd = {"model.diffusion_model." + k: v for k, v in UNetModel(cfg.unet).state_dict().items()}
    sd |= {"first_stage_model." + k: v for k, v in vq.state_dict().items()}
    sd |= {"cond_stage_model." + k: v for k, v in SpatialRescaler(cfg.spatial_rescaler).state_dict().items()}
    betas = linear_betas(0.0015, 0.0205)
    sd |= {"betas": betas.float(), "alphas_cumprod": torch.cumprod(1 - betas, 0).float()}
    save_file(sd, str(path))
    return path


def test_spatial_rescaler_is_the_original():
    """The released size (182 classes -> 3 channels, two bilinear halvings) on a one-hot map and on soft
    labels, and the class-id path (no one-hot tensor) against the one-hot forward."""
    torch.manual_seed(0)
    stage = SpatialRescaler(SpatialRescalerConfig())
    seg = labels(64, 96, n=182)
    for x in (one_hot(seg, 182), torch.rand(1, 182, 36, 52).softmax(1)):
        torch.testing.assert_close(stage(x), original_rescaler(x, stage.channel_mapper.weight), atol=1e-4, rtol=0)
    assert stage(one_hot(seg, 182)).shape == (1, 3, 16, 24)
    torch.testing.assert_close(stage.encode_ids(torch.from_numpy(seg)), stage(one_hot(seg, 182)), atol=1e-5, rtol=0)
    biased = SpatialRescaler(SpatialRescalerConfig(in_channels=5, bias=True, method="bicubic"))
    seg5 = labels(16, 16, n=5)
    torch.testing.assert_close(biased.encode_ids(torch.from_numpy(seg5)), biased(one_hot(seg5, 5)), atol=1e-5, rtol=0)


def test_pipeline_is_the_original_sampling(tmp_path):
    """get_input's one-hot segmentation -> SpatialRescaler -> DiffusionWrapper concat [x, c] -> DDIM (eta 0)
    -> decode_first_stage, restated, vs the Pipeline on a label PNG: <= 2/255."""
    cfg = get_preset("tiny-ldm-semantic")
    path = save_original(tmp_path / "semantic.safetensors", cfg)
    model = load_checkpoint(path)  # detected: the channel_mapper key makes it semantic synthesis
    assert model.config.task == "semantic" and model.config.spatial_rescaler == cfg.spatial_rescaler
    assert model.config.unet == cfg.unet and model.config.vae == cfg.vae
    seg = labels()
    Image.fromarray(seg.astype(np.uint8), mode="L").save(tmp_path / "labels.png")

    unet, vq = UNetModel(cfg.unet).eval(), build_autoencoder(cfg.vae).eval()
    unet.load_state_dict(model.unet.state_dict())
    vq.load_state_dict(model.vae.state_dict())
    c = original_rescaler(one_hot(seg, CLASSES), model.cond_stage.channel_mapper.weight)
    x_T = torch.randn(1, 3, 8, 12, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        samples = original_ddim(lambda x, t: unet(torch.cat([x, c], dim=1), t), x_T, 5, linear_betas(0.0015, 0.0205))
        expected = ((vq.decode(samples).clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy()
    out = Pipeline(model)(label_map=tmp_path / "labels.png", num_inference_steps=5, latents=x_T, output_type="np",
                          progress=False).images
    assert out.shape == (1, 32, 48, 3) and np.abs(out - expected).max() <= 2 / 255


def test_label_map_forms_agree_and_large_maps_sample_convolutionally():
    pipe = Pipeline(random_model("tiny-ldm-semantic", seed=2))
    seg = labels()
    kw = dict(num_inference_steps=1, seed=3, output_type="np", progress=False)
    ref = pipe(label_map=seg, **kw).images
    palette = Image.fromarray(seg.astype(np.uint8), mode="P")
    for form in (torch.from_numpy(seg), seg.astype(np.uint8), palette, seg.astype(np.float32),
                 np.eye(CLASSES, dtype=np.float32)[seg]):
        np.testing.assert_allclose(pipe(label_map=form, **kw).images, ref, atol=2e-6)
    other, same = (pipe(label_map=m, **{**kw, "output_type": "latent"}).latents for m in (labels(seed=5), seg))
    assert (other - same).abs().mean() > 1e-4  # the labels steer the sample
    wide = labels(32, 128, seed=1)  # 4x the tiny model's 32-pixel training width, as the paper's 1024x384 landscapes
    a = pipe(label_map=wide, **kw).images
    b = pipe(label_map=wide, tile=(8, 4), **kw).images
    assert a.shape == b.shape == (1, 32, 128, 3) and np.isfinite(b).all()


def test_released_yamls_are_the_presets(tmp_path):
    from ldm_engine.loading.yaml_config import config_from_yaml

    for name, text in (("ldm-semantic-256", SEMANTIC_YAML),
                       ("ldm-semantic-512", SEMANTIC_YAML.replace("image_size: 64", "image_size: 128"))):
        (tmp_path / "config.yaml").write_text(text)
        cfg, preset = config_from_yaml(tmp_path / "config.yaml"), get_preset(name)
        assert (cfg.unet, cfg.vae, cfg.schedule, cfg.task, cfg.spatial_rescaler, cfg.sample_size) == (
            preset.unet, preset.vae, preset.schedule, preset.task, preset.spatial_rescaler, preset.sample_size)
    tiny = SEMANTIC_YAML
    for a, b in (("model_channels: 128", "model_channels: 32"),
                 ("attention_resolutions: [32, 16, 8]", "attention_resolutions: [2]"),
                 ("channel_mult: [1, 4, 8]", "channel_mult: [1, 2]"), ("n_embed: 8192", "n_embed: 64"),
                 ("ch: 128", "ch: 32"), ("ch_mult: [1, 2, 4]", "ch_mult: [1, 1, 2]"),
                 ("num_res_blocks: 2\n          attn", "num_res_blocks: 1\n          attn"),
                 ("in_channels: 182", "in_channels: 6")):
        tiny = tiny.replace(a, b)
    (tmp_path / "tiny.yaml").write_text(tiny)
    model = load_checkpoint(save_original(tmp_path / "m.safetensors", get_preset("tiny-ldm-semantic")),
                            config=str(tmp_path / "tiny.yaml"))
    assert model.config.task == "semantic" and model.cond_stage.config.in_channels == CLASSES


def test_cli_label_map(tmp_path):
    from ldm_engine.cli import main

    path = save_original(tmp_path / "semantic.safetensors", get_preset("tiny-ldm-semantic"))
    Image.fromarray(labels(16, 32).astype(np.uint8), mode="L").save(tmp_path / "labels.png")
    out = tmp_path / "out.png"
    assert main(["--model", str(path), "--label-map", str(tmp_path / "labels.png"), "--steps", "2",
                 "-o", str(out)]) == 0
    image = Image.open(out)
    assert image.size == (32, 16) and image.text["Label map"].startswith("labels.png [")
    assert main(["--model", str(path), "--steps", "2", "-o", str(out)]) == 2  # no label map: one clear line


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_graph_backends_match_torch(backend):
    pytest.importorskip(backend)
    model = random_model("tiny-ldm-semantic", seed=1)
    kw = dict(label_map=labels(16, 24), num_inference_steps=3, seed=2, output_type="np", progress=False)
    ref = Pipeline(model, "torch")(**kw).images
    out = Pipeline(model, backend, dtype=torch.float32, progress=False)(**kw).images
    assert np.isfinite(out).all() and psnr(ref, out) >= 40


def test_bad_label_maps(tmp_path):
    pipe = Pipeline(random_model("tiny-ldm-semantic"))
    seg = labels(16, 16)
    Image.new("RGB", (16, 16)).save(tmp_path / "rgb.png")
    nan = seg.astype(np.float32)
    nan[3, 3] = np.nan
    out_of_range = seg.copy()
    out_of_range[0, :3] = [6, 9, -1]
    cases = [
        (dict(), "semantic synthesis model: pass label_map"),
        (dict(label_map=out_of_range), r"out of range \[0, 5\]: -1, 6, 9 \(3 pixels\)"),
        (dict(label_map=np.eye(5, dtype=np.float32)[seg % 5]), "one-hot label_map has 5 classes"),
        (dict(label_map=tmp_path / "rgb.png"), "mode RGB image with 3 channels"),
        (dict(label_map=nan), "NaN"),
        (dict(label_map=seg + 0.5), "non-integer"),
        (dict(label_map=seg, height=32), "sets the output size"),
        (dict(label_map=labels(18, 16)), "multiples of 8"),
        (dict(label_map=seg[0]), r"must be \(H, W\) class ids"),
        (dict(label_map=seg, image=torch.zeros(1, 3, 16, 16)), "takes label_map only"),
        (dict(label_map="typo.png"), None),
        (dict(label_map=seg, tile=(16, 0)), "stride must be in"),
    ]
    for kwargs, message in cases:
        if message is None:
            with pytest.raises(FileNotFoundError, match="no such file"):
                pipe(num_inference_steps=1, progress=False, **kwargs)
            continue
        with pytest.raises(ValueError, match=message):
            pipe(num_inference_steps=1, progress=False, **kwargs)
