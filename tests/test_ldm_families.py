"""Unconditional and class-conditional LDMs (no text encoder) through the Pipeline."""
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from ldm_engine import Pipeline, get_preset
from ldm_engine.models import ClassEmbedder, UNetModel, build_autoencoder
from ldm_engine.models.configs import UNetConfig


def _save(path, cfg, seed=0):
    torch.manual_seed(seed)
    sd = {"model.diffusion_model." + k: v for k, v in UNetModel(cfg.unet).state_dict().items()}
    sd |= {"first_stage_model." + k: v for k, v in build_autoencoder(cfg.vae).state_dict().items()}
    if cfg.conditioning == "class":
        sd |= {"cond_stage_model." + k: v for k, v in ClassEmbedder(cfg.num_classes, cfg.unet.context_dim).state_dict().items()}
    save_file(sd, str(path))
    return path


def tiny_class_config():
    cfg = get_preset("tiny-ldm-vq")
    return cfg.replace(name="tiny-cin", conditioning="class", num_classes=10, task="class",
                       unet=UNetConfig(in_channels=3, out_channels=3, model_channels=32, channel_mult=(1, 2),
                                       attention_resolutions=(1, 2), num_head_channels=8, context_dim=16, norm_groups=8))


def test_unconditional_vq_model(tmp_path):
    cfg = get_preset("tiny-ldm-vq")
    pipe = Pipeline.from_pretrained(_save(tmp_path / "m.safetensors", cfg), config="tiny-ldm-vq")
    a = pipe(height=16, width=32, num_inference_steps=3, sampler="ddim", seed=1, output_type="np", progress=False)
    b = pipe(height=16, width=32, num_inference_steps=3, sampler="ddim", seed=1, output_type="np", progress=False)
    assert a.images.shape == (1, 16, 32, 3) and np.isfinite(a.images).all()
    np.testing.assert_array_equal(a.images, b.images)
    with pytest.raises(ValueError, match="unconditional: it takes no prompt"):
        pipe("a cat", height=16, width=16, progress=False)
    with pytest.raises(ValueError, match="cannot inpaint"):
        from PIL import Image
        pipe(image=Image.new("RGB", (16, 16)), mask_image=Image.new("L", (16, 16)), progress=False)


def test_unconditional_detection_from_file(tmp_path):
    cfg = get_preset("tiny-ldm-vq")
    pipe = Pipeline.from_pretrained(_save(tmp_path / "m.safetensors", cfg))  # detected, no config
    assert pipe.config.conditioning == "none" and pipe.config.vae.kind == "vq" and pipe.config.task == "unconditional"


def test_class_conditional_model(tmp_path):
    cfg = tiny_class_config()
    pipe = Pipeline.from_pretrained(_save(tmp_path / "c.safetensors", cfg), config=cfg)
    out = pipe(class_label=[1, 7], height=16, width=16, num_inference_steps=3, seed=0, output_type="np", progress=False)
    assert out.images.shape == (2, 16, 16, 3)
    assert not np.allclose(out.images[0], out.images[1])  # the class changes the sample
    with pytest.raises(ValueError, match="class-conditional: pass class_label"):
        pipe(height=16, width=16, progress=False)
    with pytest.raises(ValueError, match=r"class_label must be in \[0, 9\]"):
        pipe(class_label=12, height=16, width=16, progress=False)
