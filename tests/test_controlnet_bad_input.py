"""ControlNet misuse: each case a clear error before any work, with the pipeline left as it was."""
import numpy as np
import pytest
import torch
from PIL import Image

from ldm_engine import Pipeline

from test_controlnet import make_controlnet


@pytest.fixture(scope="module")
def setup(sd1_folder, sd2_folder, tmp_path_factory):
    root = tmp_path_factory.mktemp("cn_bad")
    make_controlnet(sd1_folder, root / "sd1", seed=1)
    make_controlnet(sd2_folder, root / "sd2", seed=2)
    pipe = Pipeline.from_pretrained(sd1_folder)
    return pipe, root


HINT = Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8))


@pytest.mark.parametrize("kwargs,message", [
    (dict(control_image=[HINT, HINT]), "2 control image(s) for 1 loaded"),
    (dict(control_image=HINT, controlnet_conditioning_scale=-0.5), "must be >= 0, got -0.5"),
    (dict(control_image=HINT, control_guidance_start=0.6, control_guidance_end=0.6), "start=0.6, end=0.6"),
    (dict(control_image=HINT, control_guidance_end=1.5), "end=1.5"),
    (dict(control_image=HINT, controlnet_conditioning_scale=[1.0, 0.5]), "2 entries for 1 ControlNet"),
    (dict(), "pass control_image"),
    (dict(control_image=torch.full((1, 3, 16, 16), -1.0)), "must be in [0, 1]"),
    (dict(control_image="not an image".split()), "got 3 control image(s)"),
])
def test_bad_call_arguments(setup, kwargs, message):
    pipe, root = setup
    pipe.unload_controlnets()
    pipe.load_controlnet(root / "sd1")
    calls = []
    real = pipe.backend.denoise
    pipe.backend.denoise = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
            pipe("x", height=16, width=16, num_inference_steps=2, seed=0, progress=False, **kwargs)
    finally:
        pipe.backend.denoise = real
    assert calls == []  # refused before any UNet call


def test_control_image_without_controlnet(setup):
    pipe, _ = setup
    pipe.unload_controlnets()
    with pytest.raises(ValueError, match="no ControlNet is loaded"):
        pipe("x", height=16, width=16, num_inference_steps=1, control_image=HINT, progress=False)


def _bad_files(root):
    from safetensors.torch import save_file

    def w():
        return torch.zeros(4, 4)

    ckpt = root / "model.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": w(), "first_stage_model.encoder.conv_in.weight": w()}, ckpt)
    lora = root / "lora.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": w(),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": w()}, lora)
    junk = root / "junk.pth"
    torch.save({"something.weight": w()}, junk)
    return ckpt, lora, junk


def test_wrong_files_are_refused(setup, sd1_folder, tmp_path):
    pipe, root = setup
    pipe.unload_controlnets()
    pipe.load_controlnet(root / "sd1")
    ckpt, lora, junk = _bad_files(tmp_path)
    cases = [(root / "sd2", "for model \\(context 32, linear proj_in\\) models, the loaded model is model "
                            "\\(context 32, conv proj_in\\)"),
             (ckpt, "Stable Diffusion checkpoint, not a ControlNet"), (lora, "LoRA / LyCORIS file, not a ControlNet"),
             (junk, "not a ControlNet"), (sd1_folder, "whole diffusers model folder"),
             (tmp_path / "missing.safetensors", "no such ControlNet")]
    for path, message in cases:
        with pytest.raises(ValueError, match=message):
            pipe.load_controlnet(path)
    assert pipe.controlnets == ["sd1"]  # nothing half-loaded


def test_other_width_and_hint_size_are_refused(setup, tmp_path):
    from diffusers import ControlNetModel

    from conftest import diffusers_unet

    pipe, _ = setup
    ControlNetModel.from_unet(diffusers_unet("sd1", block_out_channels=(16, 32), norm_num_groups=8),
                              conditioning_embedding_out_channels=(16, 32)).save_pretrained(tmp_path / "narrow")
    with pytest.raises(ValueError, match="16 base channels, the loaded UNet 32"):
        pipe.load_controlnet(tmp_path / "narrow")
    ControlNetModel.from_unet(diffusers_unet("sd1")).save_pretrained(tmp_path / "hint8")  # /8 hint, /2 VAE
    with pytest.raises(ValueError, match="shrinks the control image 8x, the model's autoencoder 2x"):
        pipe.load_controlnet(tmp_path / "hint8")


def test_sd2_controlnet_loads_on_sd2_and_single_files_too(sd2_folder, setup, tmp_path):
    from test_controlnet import original_files

    pipe2 = Pipeline.from_pretrained(sd2_folder)
    _, root = setup
    assert pipe2.load_controlnet(root / "sd2") == "sd2"
    a, b = original_files(root / "sd2", pipe2.config.unet, tmp_path)
    assert pipe2.load_controlnet(a) == "cn_prefixed" and pipe2.load_controlnet(b) == "cn_bare"
    assert pipe2.controlnets == ["sd2", "cn_prefixed", "cn_bare"]
    pipe2.unload_controlnets()
    assert pipe2.controlnets == []


def test_triton_kernels_are_swapped_in_like_the_unet(sd1_folder, setup):
    """With kernels='triton' the ControlNet gets the UNet's kernel swap; same residuals (interpreter on CPU)."""
    from ldm_engine.control import read_controlnet
    from ldm_engine.optimize.kernel_swap import KernelCrossAttention

    _, root = setup
    pipe = Pipeline.from_pretrained(sd1_folder, kernels="triton")
    pipe.load_controlnet(root / "sd1")
    net = pipe.control.loaded[0].module
    assert any(isinstance(m, KernelCrossAttention) for m in net.modules())
    ref = read_controlnet(root / "sd1", pipe.config.unet)
    x, hint, ctx = torch.randn(1, 4, 4, 4), torch.rand(1, 3, 8, 8), torch.randn(1, 3, 32)
    with torch.no_grad():
        err = max((a - b).abs().max().item() for a, b in zip(net(x, hint, 10, ctx), ref(x, hint, 10, ctx)))
    assert err <= 1e-4


def test_backend_without_control_is_refused(setup):
    """A backend whose denoise takes no residuals refuses at load time."""
    from types import SimpleNamespace

    from ldm_engine.control.manager import ControlNets

    pipe, root = setup
    nets = ControlNets(pipe.model, SimpleNamespace(name="other"))
    with pytest.raises(ValueError, match="other backend does not run ControlNets; use backend='torch'"):
        nets.load(root / "sd1")
    assert nets.loaded == []
