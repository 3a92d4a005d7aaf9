"""Loading real files offline: original single files (.safetensors, .ckpt), diffusers folders, presets,
original YAML configs, EMA weights, and architecture detection from key names and shapes."""
import pytest
import torch
from safetensors.torch import save_file

from ldm_engine import get_preset, load_checkpoint
from ldm_engine.loading.detect import detect_config
from ldm_engine.models import PRESETS, ClassEmbedder, CLIPTextEncoder, UNetModel, build_autoencoder


def original_layout(model) -> dict[str, torch.Tensor]:
    """A loaded model written back in the original single-file layout."""
    sd = {"model.diffusion_model." + k: v for k, v in model.unet.state_dict().items()}
    sd |= {"first_stage_model." + k: v for k, v in model.vae.state_dict().items()}
    if model.text_encoder is not None:
        sd |= {"cond_stage_model.transformer.text_model." + k: v for k, v in model.text_encoder.state_dict().items()}
    return {k: v.contiguous() for k, v in sd.items()}


def random_model_file(path, preset: str, seed: int = 0):
    cfg = get_preset(preset)
    torch.manual_seed(seed)
    sd = {"model.diffusion_model." + k: v for k, v in UNetModel(cfg.unet).state_dict().items()}
    sd |= {"first_stage_model." + k: v for k, v in build_autoencoder(cfg.vae).state_dict().items()}
    if cfg.text_encoder:
        sd |= {"cond_stage_model.transformer.text_model." + k: v
               for k, v in CLIPTextEncoder(cfg.text_encoder).state_dict().items()}
    save_file(sd, str(path))
    return path


def outputs(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, model.config.unet.in_channels, 8, 8, generator=g)
    ids = torch.randint(0, 1000, (1, 77), generator=g)
    with torch.no_grad():
        ctx = model.text_encoder(ids)
        return ctx, model.unet(x, 10, ctx), model.vae.decode(torch.randn(1, 4, 4, 4, generator=g))


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_single_file_round_trip(sd1_folder, tmp_path, suffix):
    folder_model = load_checkpoint(sd1_folder)
    path = tmp_path / f"model{suffix}"
    sd = original_layout(folder_model)
    if suffix == ".ckpt":
        torch.save({"state_dict": sd, "global_step": 7}, path)
    else:
        save_file(sd, str(path))
    single = load_checkpoint(path, config=folder_model.config)
    for part in ("unet", "vae", "text_encoder"):  # the same weights, bit for bit
        mine, theirs = getattr(folder_model, part).state_dict(), getattr(single, part).state_dict()
        assert mine.keys() == theirs.keys()
        for k in mine:
            assert torch.equal(mine[k], theirs[k]), k
    # outputs agree to float32 rounding: oneDNN may pick other kernels for differently aligned buffers
    for a, b in zip(outputs(folder_model), outputs(single)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_ema_weights_are_used_when_present(sd1_folder, tmp_path):
    model = load_checkpoint(sd1_folder)
    sd = original_layout(model)
    for k, v in list(sd.items()):
        if k.startswith("model.diffusion_model."):
            sd["model_ema.diffusion_model" + k[len("model.diffusion_model."):].replace(".", "")] = v + 0.01
    save_file(sd, str(tmp_path / "ema.safetensors"))
    ema = load_checkpoint(tmp_path / "ema.safetensors", config=model.config)
    live = load_checkpoint(tmp_path / "ema.safetensors", config=model.config, use_ema=False)
    torch.testing.assert_close(ema.unet.out[2].weight, model.unet.out[2].weight + 0.01)
    torch.testing.assert_close(live.unet.out[2].weight, model.unet.out[2].weight)


def test_preset_by_name(tmp_path):
    path = random_model_file(tmp_path / "tiny.safetensors", "tiny-sd1")
    model = load_checkpoint(path, config="tiny-sd1")
    assert model.config.name == "tiny-sd1" and model.tokenizer is not None
    assert all(not p.requires_grad for p in model.unet.parameters())


def test_dtype_is_applied(tmp_path):
    path = random_model_file(tmp_path / "tiny.safetensors", "tiny-sd1")
    model = load_checkpoint(path, config="tiny-sd1", dtype=torch.bfloat16)
    assert model.unet.out[2].weight.dtype == torch.bfloat16


YAML = """
model:
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    linear_start: 0.00085
    linear_end: 0.012
    timesteps: 1000
    image_size: 8
    scale_factor: 0.18215
    parameterization: "v"
    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        use_checkpoint: True
        image_size: 32
        in_channels: 4
        out_channels: 4
        model_channels: 32
        attention_resolutions: [1, 2]
        num_res_blocks: 2
        channel_mult: [1, 2]
        num_heads: 2
        use_spatial_transformer: True
        transformer_depth: 1
        context_dim: 32
        norm_groups: 8
        legacy: False
    first_stage_config:
      target: ldm.models.autoencoder.AutoencoderKL
      params:
        embed_dim: 4
        ddconfig:
          double_z: true
          z_channels: 4
          resolution: 256
          in_channels: 3
          out_ch: 3
          ch: 32
          ch_mult: [1, 2]
          num_res_blocks: 1
          attn_resolutions: []
          dropout: 0.0
          norm_groups: 8
    cond_stage_config:
      target: ldm.modules.encoders.modules.FrozenCLIPEmbedder
"""


def test_original_yaml_config():
    from ldm_engine.loading.yaml_config import config_from_yaml
    import tempfile, pathlib

    path = pathlib.Path(tempfile.mkdtemp()) / "v-model.yaml"
    path.write_text(YAML)
    cfg = config_from_yaml(path)
    tiny = get_preset("tiny-sd1")
    assert cfg.unet == tiny.unet and cfg.vae == tiny.vae
    assert cfg.prediction_type == "v" and cfg.conditioning == "text" and cfg.text_encoder.layers == 12


def _meta_state(preset: str) -> tuple:
    """Key -> meta tensor of every component of a full-size preset, in the original layout."""
    cfg = get_preset(preset)
    with torch.device("meta"):
        unet = UNetModel(cfg.unet).state_dict()
        vae = build_autoencoder(cfg.vae).state_dict()
        text = CLIPTextEncoder(cfg.text_encoder).state_dict() if cfg.text_encoder else {}
        cls = ClassEmbedder(cfg.num_classes, cfg.unet.context_dim).state_dict() if cfg.conditioning == "class" else {}
    return cfg, unet, vae, text, cls


@pytest.mark.parametrize("preset", ["sd-1.5", "sd-1.5-inpaint", "sd-2.1-v", "sd-2-inpaint", "sd-x4-upscaler",
                                    "ldm-vq-f4", "ldm-kl-f8", "ldm-vq-f8-cin"])
def test_detection_recovers_full_size_presets(preset):
    cfg, unet, vae, text, cls = _meta_state(preset)
    openclip = cfg.text_encoder is not None and cfg.text_encoder.act == "gelu"
    found = detect_config(unet, vae, text, openclip, cls, name=preset)
    if preset == "ldm-kl-f8":  # head counts are not stored in weights; detection assumes 32-wide heads
        found.unet.num_heads, found.unet.num_head_channels = 8, -1
    assert found.unet == cfg.unet
    assert found.vae.ch_mult == cfg.vae.ch_mult and found.vae.kind == cfg.vae.kind
    assert found.vae.z_channels == cfg.vae.z_channels and found.vae.n_embed == cfg.vae.n_embed
    assert found.text_encoder == cfg.text_encoder
    assert (found.task, found.conditioning, found.prediction_type) == (cfg.task, cfg.conditioning, cfg.prediction_type)
    assert found.num_classes == cfg.num_classes


def test_every_preset_builds():
    for name in PRESETS:
        cfg = get_preset(name)
        with torch.device("meta"):
            UNetModel(cfg.unet), build_autoencoder(cfg.vae)


def test_sd15_parameter_counts():
    cfg = get_preset("sd-1.5")
    with torch.device("meta"):
        n = lambda m: sum(p.numel() for p in m.parameters())
        assert n(UNetModel(cfg.unet)) == 859_520_964
        assert n(build_autoencoder(cfg.vae)) == 83_653_863
        assert n(CLIPTextEncoder(cfg.text_encoder)) == 123_060_480


def test_scale_factor_buffer_of_the_file_wins(tmp_path):
    path = tmp_path / "m.safetensors"
    random_model_file(path, "tiny-sd1")
    from safetensors.torch import load_file

    sd = load_file(str(path))
    sd["scale_factor"] = torch.tensor(0.5)
    save_file(sd, str(path))
    assert load_checkpoint(path, config="tiny-sd1").config.scale_factor == 0.5
