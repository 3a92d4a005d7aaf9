"""SD 2 depth-to-image: parity with diffusers' StableDiffusionDepth2ImgPipeline (tiny random weights saved by
diffusers / transformers, `depth_map=` given so no depth estimator runs), the same weights in the original
single-file layout (OpenCLIP text keys, `depth_model.*` tensors), detection, the original YAML, the
native loop, the graph backends, the CLI and bad depth input."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import hf_to_openclip, save_diffusers_folder
from ldm_engine import Pipeline
from ldm_engine.conditioning.depth import load_depth_map, prepare_depth
from ldm_engine.loading import CheckpointError, load_checkpoint, random_model
from ldm_engine.loading.detect import detect_config
from ldm_engine.loading.yaml_config import config_from_yaml
from ldm_engine.models import CLIPTextEncoder, UNetModel, build_autoencoder, get_preset

TOL = 2 / 255
CPU = torch.device("cpu")


def _image(h=16, w=24, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


def _depth(n=1, h=20, w=30, seed=0):
    """A smooth depth-like field (N, H, W): a ramp plus a bump, larger = nearer."""
    g = torch.Generator().manual_seed(seed)
    y, x = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    centres = torch.rand(n, 2, generator=g)
    out = [3.0 + 2.0 * x + 4.0 * torch.exp(-((x - a) ** 2 + (y - b) ** 2) / 0.05) for a, b in centres]
    return torch.stack(out)


def _tiny_dpt(root):
    """A tiny DPT depth estimator + processor: the components a real depth folder lists (never run here)."""
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor

    torch.manual_seed(3)
    cfg = DPTConfig(hidden_size=16, num_hidden_layers=4, num_attention_heads=2, intermediate_size=32, image_size=32,
                    patch_size=8, neck_hidden_sizes=[8, 8, 8, 8], fusion_hidden_size=8)
    DPTForDepthEstimation(cfg).save_pretrained(root / "depth_estimator")
    DPTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(root / "feature_extractor")


@pytest.fixture(scope="module")
def depth_folder(tmp_path_factory):
    """A diffusers depth folder: 5-channel SD2-style UNet, KL VAE, gelu CLIP text encoder, eps DDIM scheduler,
    a tiny DPT depth estimator and its processor, model_index of StableDiffusionDepth2ImgPipeline."""
    from diffusers import DDIMScheduler

    root = save_diffusers_folder(tmp_path_factory.mktemp("depth"), "sd2", in_channels=5)
    DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1, clip_sample=False,
                  set_alpha_to_one=False, prediction_type="epsilon").save_pretrained(root / "scheduler")
    _tiny_dpt(root)
    index = json.loads((root / "model_index.json").read_text())
    index |= {"_class_name": "StableDiffusionDepth2ImgPipeline",
              "depth_estimator": ["transformers", "DPTForDepthEstimation"],
              "feature_extractor": ["transformers", "DPTImageProcessor"]}
    index.pop("safety_checker")
    (root / "model_index.json").write_text(json.dumps(index))
    return root


@pytest.fixture(scope="module")
def ref(depth_folder):
    import diffusers

    pipe = diffusers.StableDiffusionDepth2ImgPipeline.from_pretrained(depth_folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def model(depth_folder):
    return load_checkpoint(depth_folder)


@pytest.fixture(scope="module")
def tiny():
    return random_model("tiny-sd2-depth", seed=4)


# ---- parity with diffusers ----------------------------------------------------------------------

def test_folder_loads_as_depth_model(depth_folder, caplog):
    with caplog.at_level(logging.INFO, logger="ldm_engine.loading.checkpoint"):
        m = load_checkpoint(depth_folder)
    cfg = m.config
    assert (cfg.task, cfg.prediction_type, cfg.unet.in_channels, cfg.text_encoder.act) == ("depth", "eps", 5, "gelu")
    assert "ignoring its depth_estimator" in caplog.text


@pytest.mark.parametrize("sampler", ["ddim", "euler"])
def test_depth2img_matches_diffusers(ref, model, sampler):
    import diffusers

    if sampler == "euler":
        euler = diffusers.EulerDiscreteScheduler.from_config(ref.scheduler.config)
        ref = diffusers.StableDiffusionDepth2ImgPipeline(**{**ref.components, "scheduler": euler})
        ref.set_progress_bar_config(disable=True)
    kw = dict(image=_image(), depth_map=_depth(), negative_prompt="blurry", num_images_per_prompt=2,
              num_inference_steps=8, strength=0.7, guidance_scale=5.0, output_type="np")
    expected = ref("a stone statue", generator=torch.Generator().manual_seed(5), **kw).images
    got = Pipeline(model)("a stone statue", seed=5, sampler=sampler, progress=False, **kw).images
    assert got.shape == expected.shape == (2, 16, 24, 3)
    assert np.abs(got - expected).max() <= TOL


def test_default_strength_is_diffusers(ref, model):
    kw = dict(image=_image(16, 16), depth_map=_depth(1, 9, 9), num_inference_steps=5, guidance_scale=4.0,
              output_type="np")
    expected = ref("a cat", generator=torch.Generator().manual_seed(2), **kw).images  # strength 0.8
    got = Pipeline(model)("a cat", seed=2, progress=False, **kw).images
    assert np.abs(got - expected).max() <= TOL


def test_depth_channel_is_diffusers_prepare_depth_map(ref):
    depth = _depth(2, 13, 17, seed=1) * 100
    expected = ref.prepare_depth_map([_image()] * 2, depth, 2, False, torch.float32, CPU)  # latent 8 x 12
    got = prepare_depth(depth, (8, 12), 2)
    assert got.shape == expected.shape == (2, 1, 8, 12)
    assert (got - expected).abs().max() <= 1e-6
    assert got.amin(dim=(1, 2, 3)).tolist() == [-1.0, -1.0] and torch.allclose(got.amax(dim=(1, 2, 3)), torch.ones(2))
    one = ref.prepare_depth_map([_image()], depth[:1], 3, True, torch.float32, CPU)  # repeated, then the CFG pair
    assert (torch.cat([prepare_depth(depth[:1], (8, 12), 3)] * 2) - one).abs().max() <= 1e-6


def test_without_image_starts_from_pure_noise(ref, model):
    """The original scripts' strength-1 path: fresh noise, the depth map the only structure. Reference: the
    diffusers components in a hand-written DDIM loop (no diffusers pipeline samples without an image)."""
    from diffusers import DDIMScheduler

    depth, steps, g = _depth(1, 11, 19, seed=2), 6, 4.0
    sched = DDIMScheduler.from_config(ref.scheduler.config)
    sched.set_timesteps(steps)
    latents = torch.randn((1, 4, 8, 12), generator=torch.Generator().manual_seed(9))
    cond, uncond = ref.encode_prompt("a castle", CPU, 1, True, "")
    context = torch.cat([uncond, cond])
    d = ref.prepare_depth_map([_image()], depth, 1, True, torch.float32, CPU)
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.scale_model_input(torch.cat([latents] * 2), t)
            out_u, out_c = ref.unet(torch.cat([x, d], dim=1), t, encoder_hidden_states=context).sample.chunk(2)
            latents = sched.step(out_u + g * (out_c - out_u), t, latents).prev_sample
        expected = (ref.vae.decode(latents / ref.vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
    got = Pipeline(model)("a castle", depth_map=depth, height=16, width=24, num_inference_steps=steps,
                          guidance_scale=g, seed=9, progress=False, output_type="pt").images
    assert (got - expected).abs().max() <= TOL
    other = Pipeline(model)("a castle", depth_map=depth.flip(-1), height=16, width=24, num_inference_steps=steps,
                            guidance_scale=g, seed=9, progress=False, output_type="pt").images
    assert (other - got).abs().max() > 1e-3  # the depth channel reaches the UNet


# ---- the original single-file layout, detection, YAML ------------------------------------------

def _original_state(m) -> dict:
    """A LatentDepth2ImageDiffusion state dict as 512-depth-ema.ckpt holds it: UNet, autoencoder, OpenCLIP
    text tower, the MiDaS `depth_model.*` weights (stand-ins here) and the schedule buffers."""
    sd = {"model.diffusion_model." + k: v for k, v in m.unet.state_dict().items()}
    sd |= {"first_stage_model." + k: v for k, v in m.vae.state_dict().items()}
    sd |= {"cond_stage_model.model." + k: v for k, v in hf_to_openclip(m.text_encoder.state_dict(), logit_scale=True).items()}
    g = torch.Generator().manual_seed(0)
    sd |= {"depth_model.model.pretrained.model.cls_token": torch.randn(1, 1, 8, generator=g),
           "depth_model.model.scratch.output_conv.0.weight": torch.randn(4, 8, 3, 3, generator=g),
           "depth_model.model.scratch.refinenet1.out_conv.bias": torch.randn(8, generator=g)}
    sd |= {"betas": torch.linspace(0.00085, 0.012, 1000), "alphas_cumprod": torch.ones(1000)}
    return sd


def test_original_single_file_matches_the_folder(model, tmp_path, caplog):
    path = tmp_path / "512-depth-ema.ckpt"
    torch.save({"state_dict": _original_state(model), "global_step": 0}, path)
    with caplog.at_level(logging.INFO, logger="ldm_engine.loading.checkpoint"):
        detected = load_checkpoint(path)  # read with weights_only=True, the architecture from the keys
    assert "ignoring its 3 depth_model.* tensors" in caplog.text
    cfg = detected.config
    assert (cfg.task, cfg.prediction_type, cfg.sample_size, cfg.scale_factor) == ("depth", "eps", 64, 0.18215)
    assert (cfg.unet.in_channels, cfg.text_encoder.act, cfg.text_encoder.output_layer) == (5, "gelu", -2)
    # head and group counts leave no trace in the weights: the tiny model takes its own config
    loaded = load_checkpoint(path, config=model.config)
    loaded.tokenizer = model.tokenizer  # single files carry no vocabulary; the tiny text encoder has its own
    kw = dict(image=_image(), depth_map=_depth(), num_inference_steps=4, guidance_scale=5.0, seed=1, output_type="np",
              progress=False)
    assert np.abs(Pipeline(loaded)("a statue", **kw).images - Pipeline(model)("a statue", **kw).images).max() <= 1e-6


def test_detection_recovers_the_full_size_preset():
    cfg = get_preset("sd-2-depth")
    with torch.device("meta"):
        unet, vae = UNetModel(cfg.unet).state_dict(), build_autoencoder(cfg.vae).state_dict()
        text = CLIPTextEncoder(cfg.text_encoder).state_dict()
    found = detect_config(unet, vae, text, True, {}, name="512-depth-ema")
    assert found.unet == cfg.unet and found.text_encoder == cfg.text_encoder
    assert (found.task, found.prediction_type, found.sample_size) == ("depth", "eps", 64)


_MIDAS_YAML = """
model:
  target: ldm.models.diffusion.ddpm.LatentDepth2ImageDiffusion
  params:
    linear_start: 0.00085
    linear_end: 0.0120
    timesteps: 1000
    image_size: 64
    channels: 4
    conditioning_key: hybrid
    scale_factor: 0.18215
    depth_stage_config:
      target: ldm.modules.midas.api.MiDaSInference
      params: {model_type: dpt_hybrid}
    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params: {use_checkpoint: true, image_size: 32, in_channels: IN, out_channels: 4, model_channels: 320,
               attention_resolutions: [4, 2, 1], num_res_blocks: 2, channel_mult: [1, 2, 4, 4], num_head_channels: 64,
               use_spatial_transformer: true, use_linear_in_transformer: true, transformer_depth: 1,
               context_dim: 1024, legacy: false}
    first_stage_config:
      target: ldm.models.autoencoder.AutoencoderKL
      params:
        embed_dim: 4
        ddconfig: {double_z: true, z_channels: 4, resolution: 256, in_channels: 3, out_ch: 3, ch: 128,
                   ch_mult: [1, 2, 4, 4], num_res_blocks: 2, attn_resolutions: [], dropout: 0.0}
        lossconfig: {target: torch.nn.Identity}
    cond_stage_config:
      target: ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder
      params: {freeze: true, layer: penultimate}
"""


def test_original_yaml_gives_the_preset(tmp_path):
    path = tmp_path / "v2-midas-inference.yaml"
    path.write_text(_MIDAS_YAML.replace("IN", "5"))
    cfg, preset = config_from_yaml(path), get_preset("sd-2-depth")
    assert cfg.unet == preset.unet and cfg.vae == preset.vae and cfg.text_encoder == preset.text_encoder
    assert (cfg.task, cfg.prediction_type, cfg.scale_factor, cfg.schedule) == ("depth", "eps", 0.18215, preset.schedule)
    path.write_text(_MIDAS_YAML.replace("IN", "4"))
    with pytest.raises(CheckpointError, match="5 input channels"):
        config_from_yaml(path)


# ---- the native loop and the graph backends ----------------------------------------------------

@pytest.mark.parametrize("sampler", ["ddim", "euler_a"])
def test_native_loop_matches_python(tiny, sampler, monkeypatch):
    from ldm_engine.sampling import native

    if not native.available(sampler):
        pytest.skip("the native extension is not built")
    calls, real = [], native.run_native
    monkeypatch.setattr(native, "run_native", lambda *a, **k: calls.append(1) or real(*a, **k))
    kw = dict(prompt="a castle", depth_map=_depth(), height=16, width=24, num_inference_steps=5, guidance_scale=5.0,
              seed=3, sampler=sampler, output_type="latent", progress=False)
    for image in (None, _image()):
        cpp = Pipeline(tiny, scheduler="cpp")(image=image, **kw).latents
        py = Pipeline(tiny, scheduler="python")(image=image, **kw).latents
        assert (cpp - py).abs().max() <= 1e-6
    assert len(calls) == 2


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_graph_backends_match_torch(tiny, backend):
    """The UNet graph takes the 5-channel input (latent + depth); fp32 images >= 40 dB against torch."""
    pytest.importorskip("onnx")
    pytest.importorskip(backend)
    from ldm_engine.bench import psnr

    torch_pipe, graph_pipe = Pipeline(tiny, "torch"), Pipeline(tiny, backend, dtype=torch.float32, progress=False)
    kw = dict(prompt=["a castle"], depth_map=_depth(), height=16, width=24, num_inference_steps=4, guidance_scale=5.0,
              seed=3, output_type="np", progress=False)
    for extra in ({"image": _image(), "strength": 0.6}, {}):
        ref, out = torch_pipe(**kw, **extra).images, graph_pipe(**kw, **extra).images
        assert np.isfinite(out).all() and psnr(ref, out) >= 40


# ---- depth input: forms, batches, the CLI, bad input -------------------------------------------

def test_depth_images_keep_their_values(tmp_path):
    d16 = (np.arange(12 * 10).reshape(12, 10) * 500).astype(np.uint16)
    Image.fromarray(d16).save(tmp_path / "d16.png")
    assert torch.equal(load_depth_map(tmp_path / "d16.png"), torch.from_numpy(d16.astype(np.float32))[None, None])
    grey = np.arange(120, dtype=np.uint8).reshape(12, 10)
    rgb = Image.fromarray(np.stack([grey] * 3, -1))
    assert torch.equal(load_depth_map(rgb), torch.from_numpy(grey.astype(np.float32))[None, None])
    as_float = d16.astype(np.float32) / 7
    assert torch.equal(load_depth_map(Image.fromarray(as_float))[0, 0], torch.from_numpy(as_float))
    assert load_depth_map([d16, d16]).shape == (2, 1, 12, 10)
    assert load_depth_map(np.ones((3, 1, 5, 6), dtype=np.float64)).shape == (3, 1, 5, 6)


def test_unreadable_depth_files(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_depth_map(tmp_path / "missing.png")
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(ValueError, match="is not a readable image"):
        load_depth_map(tmp_path / "notes.png")


def test_one_depth_map_per_image(tiny):
    pipe, d = Pipeline(tiny), _depth(2, seed=5)
    kw = dict(height=16, width=24, num_inference_steps=3, guidance_scale=5.0, output_type="np", progress=False)
    both = pipe(["a castle", "a tree"], depth_map=d, seed=[1, 2], **kw).images
    for i, prompt in enumerate(["a castle", "a tree"]):
        alone = pipe(prompt, depth_map=d[i], seed=i + 1, **kw).images[0]
        assert np.abs(both[i] - alone).max() <= 1e-5


def test_cli_depth(depth_folder, tmp_path, capsys):
    from ldm_engine.cli import main

    depth_png, image_png = tmp_path / "depth.png", tmp_path / "in.png"
    Image.fromarray((_depth(1, 16, 16)[0] * 1000).numpy().astype(np.uint16)).save(depth_png)
    _image(16, 16).save(image_png)
    common = ["a stone statue", "--model", str(depth_folder), "--steps", "2", "--seed", "4", "--depth", str(depth_png)]
    assert main(common + ["--image", str(image_png), "-o", str(tmp_path / "a.png")]) == 0
    png = Image.open(tmp_path / "a.png")
    assert png.size == (16, 16) and png.text["Depth map"].startswith("depth.png [")
    assert f"Depth map: {png.text['Depth map']}" in png.text["parameters"]
    same = Pipeline.from_pretrained(depth_folder)("a stone statue", image=image_png, depth_map=depth_png,
                                                  num_inference_steps=2, seed=4, progress=False).images[0]
    assert np.array_equal(np.asarray(png.convert("RGB")), np.asarray(same))
    assert main(common + ["--size", "24x16", "-o", str(tmp_path / "b.png")]) == 0  # no image: from noise
    assert Image.open(tmp_path / "b.png").size == (24, 16)
    capsys.readouterr()
    assert main(common[:-2] + ["-o", str(tmp_path / "c.png")]) == 2
    assert "pass depth_map=" in capsys.readouterr().err
    (tmp_path / "prompts.txt").write_text("a castle\n")
    assert main(common[1:] + ["--prompts", str(tmp_path / "prompts.txt"), "--out", str(tmp_path / "shots")]) == 2
    assert "--depth does not apply to --prompts" in capsys.readouterr().err


BAD_DEPTH = [
    (None, "is a depth-to-image model: pass depth_map="),
    (torch.rand(30), r"must have shape \(H, W\), \(N, H, W\) or \(N, 1, H, W\); got \(30,\)"),
    (torch.rand(1, 3, 8, 8), r"got \(1, 3, 8, 8\)"),
    (torch.rand(1, 1, 1, 8, 8), r"got \(1, 1, 1, 8, 8\)"),
    (np.random.rand(32, 32, 3), "looks like an \\(H, W, C\\) colour image"),
    (torch.full((8, 8), float("nan")), "64 NaN or infinite value"),
    (torch.tensor([[1.0, float("inf")], [0.0, 2.0]]), "1 NaN or infinite value"),
    (torch.full((12, 12), 0.25), "depth map 0 is flat"),
    (torch.full((12, 12), 1000.0) + 1e-4 * torch.rand(12, 12), "depth map 0 is flat"),  # constant up to rounding
    (torch.zeros(0, 8), "is empty"),
    (torch.rand(3, 8, 8) + 0.1, "3 depth maps for 2 images"),
    (torch.rand(8, 8, dtype=torch.complex64), "must hold real numbers"),
    (np.array([["a", "b"], ["c", "d"]]), "must hold real numbers"),
    ({"depth": 1}, "must be an array, a tensor, a PIL image"),
    ([torch.rand(8, 8), torch.rand(9, 8)], "differ in size"),
    ([], "empty list"),
]


@pytest.mark.parametrize("depth_map,message", BAD_DEPTH)
def test_bad_depth_input_is_refused(tiny, depth_map, message):
    before = {k: v.clone() for k, v in tiny.unet.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        Pipeline(tiny)(["a", "b"], depth_map=depth_map, height=16, width=16, num_inference_steps=2, progress=False)
    after = tiny.unet.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())


def test_depth_arguments_on_the_wrong_model(tiny, tiny_sd1):
    with pytest.raises(ValueError, match="not a depth-to-image model: depth_map applies only"):
        Pipeline(tiny_sd1)("a", depth_map=_depth(), height=16, width=16, progress=False)
    with pytest.raises(ValueError, match="does not inpaint: leave mask_image unset"):
        Pipeline(tiny)("a", image=_image(16, 16), mask_image=Image.new("L", (16, 16), 255), depth_map=_depth(),
                       progress=False)
