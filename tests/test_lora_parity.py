"""The same LoRA through diffusers (load_lora_weights + fuse_lora(lora_scale)) and through ldm_engine
(load_lora(scale)): images within 2/255 and merged weights within float32 rounding; every file layout of
one LoRA (PEFT with and without alphas, kohya in both UNet namings, older diffusers keys, OpenCLIP text
encoder names) merges to the same weights."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch

pytest.importorskip("peft")

from test_lora_keys import (assert_same_bits, peft_lora, save_peft, save_tensors, to_kohya,  # noqa: E402
                            weights)

from ldm_engine import Pipeline  # noqa: E402
from ldm_engine.loading.keymaps import diffusers_unet_to_original  # noqa: E402

TOL = 2 / 255
KW = dict(num_inference_steps=4, guidance_scale=5.0, height=16, width=16, output_type="np")
PROMPT = "a photo of a cat"
UP_ATTENTION = {"sd1": (False, True), "sd2": (True, True)}


@pytest.fixture(scope="module")
def files(tmp_path_factory, sd1_folder, sd2_folder):
    """Per style: the folder and one random LoRA (UNet alpha 8, text alpha 4, rank 4) in every layout."""
    out = {}
    for style, folder in (("sd1", sd1_folder), ("sd2", sd2_folder)):
        d = tmp_path_factory.mktemp(f"lora_{style}")
        usd, tsd, ucfg, tcfg = peft_lora(folder, seed=1 if style == "sd1" else 2)
        out[style] = {
            "folder": folder, "usd": usd, "tsd": tsd,
            "peft": save_peft(d / "peft.safetensors", usd, tsd, ucfg, tcfg),
            "kohya": save_tensors(d / "kohya.safetensors", to_kohya(usd, tsd, 8.0, 4.0)),
            "original": save_tensors(d / "original.safetensors",
                                     to_kohya(usd, tsd, 8.0, 4.0, "original", up_attention=UP_ATTENTION[style])),
        }
    return out


def _diffusers(folder, lora, scale):
    import diffusers

    ref = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    ref.load_lora_weights(lora.parent, weight_name=lora.name)
    ref.fuse_lora(lora_scale=scale)
    return ref


def _fused_weights(ref, model) -> dict[str, torch.Tensor]:
    """diffusers' fused UNet / text encoder weights in the reference layout (LoRA layers dropped)."""
    cfg = model.config.unet
    n = len(cfg.channel_mult)
    sd = {k.replace(".base_layer", ""): v for k, v in ref.unet.state_dict().items() if "lora_" not in k}
    unet = diffusers_unet_to_original(sd, cfg.num_res_blocks, [2 ** (n - 1 - i) in cfg.attention_resolutions
                                                               for i in range(n)])
    text = {k.replace(".base_layer", ""): v for k, v in ref.text_encoder.state_dict().items() if "lora_" not in k}
    out = {f"unet.{k}": v for k, v in unet.items()}
    out |= {f"text_encoder.{k}": v for k, v in text.items() if "position_ids" not in k}
    return out


@pytest.mark.parametrize("style,scale", [("sd1", 0.7), ("sd2", 1.3)])
def test_peft_file_matches_diffusers_fuse_lora(files, style, scale):
    f = files[style]
    ref = _diffusers(f["folder"], f["peft"], scale)
    expected = ref(PROMPT, generator=torch.Generator().manual_seed(1), **KW).images
    pipe = Pipeline.from_pretrained(f["folder"])
    before = pipe(PROMPT, seed=1, progress=False, **KW).images
    name = pipe.load_lora(f["peft"], scale=scale)
    got = pipe(PROMPT, seed=1, progress=False, **KW).images
    assert np.abs(before - expected).max() > 20 * TOL  # the LoRA does change the picture
    assert np.abs(got - expected).max() <= TOL
    ours, theirs = weights(pipe.model), _fused_weights(ref, pipe.model)
    changed = [k for k in theirs if k in ours and not k.startswith("vae")]
    assert len(changed) > 100
    assert max((ours[k] - theirs[k]).abs().max().item() for k in changed) <= 1e-6
    info = pipe.loras[0]
    assert info["name"] == name == "peft" and info["matched"] == info["modules"] and info["layout"] == "peft"
    assert info["unet_modules"] > 50 and info["text_encoder_modules"] == 18


def test_kohya_file_matches_diffusers(files):
    """diffusers reads kohya files too (its own key conversion): the same merged weights."""
    f = files["sd1"]
    ref = _diffusers(f["folder"], f["kohya"], 0.8)
    pipe = Pipeline.from_pretrained(f["folder"])
    pipe.load_lora(f["kohya"], scale=0.8)
    theirs, ours = _fused_weights(ref, pipe.model), weights(pipe.model)
    assert max((ours[k] - theirs[k]).abs().max().item() for k in theirs if k in ours) <= 1e-6


@pytest.mark.parametrize("style", ["sd1", "sd2"])
def test_every_layout_of_one_lora_merges_to_the_same_weights(files, style, tmp_path):
    f = files[style]
    pipe = Pipeline.from_pretrained(f["folder"])
    merged = {}
    legacy = {}  # the older diffusers keys: unet.<...>.processor.to_q_lora.down.weight, ...lora.down.weight
    for key, value in f["usd"].items():
        module, _, role = key.rpartition(".lora_")
        ud = "down" if role == "A.weight" else "up"
        if m := re.fullmatch(r"(.+)\.(attn[12])\.(to_q|to_k|to_v|to_out\.0)", module):
            proj = "to_out" if m[3] == "to_out.0" else m[3]
            legacy[f"unet.{m[1]}.{m[2]}.processor.{proj}_lora.{ud}.weight"] = value
        else:
            legacy[f"unet.{module}.lora.{ud}.weight"] = value
        legacy[f"unet.{module}.alpha"] = torch.tensor(8.0)
    for key, value in f["tsd"].items():
        module, _, role = key.rpartition(".lora_")
        ud = "down" if role == "A.weight" else "up"
        parent, _, proj = module.rpartition(".")
        if proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            legacy[f"text_encoder.{parent}.to_{proj[0] if proj != 'out_proj' else 'out'}_lora.{ud}.weight"] = value
        else:
            legacy[f"text_encoder.{module}.lora_linear_layer.{ud}.weight"] = value
        legacy[f"text_encoder.{module}.alpha"] = torch.tensor(4.0)
    files_ = dict(peft=f["peft"], kohya=f["kohya"], original=f["original"],
                  legacy=save_tensors(tmp_path / "legacy.safetensors", legacy))
    for layout, path in files_.items():
        pipe.load_lora(path, scale=0.6)
        merged[layout] = weights(pipe.model)
        pipe.unload_loras()
    for layout in ("kohya", "original", "legacy"):
        assert_same_bits(merged[layout], merged["peft"])


def test_without_alphas_the_scale_is_one_as_in_diffusers(files, tmp_path):
    """A PEFT file with no adapter metadata: alpha = rank (diffusers' reading)."""
    f = files["sd1"]
    path = save_peft(tmp_path / "noalpha.safetensors", f["usd"], f["tsd"])
    ref = _diffusers(f["folder"], path, 0.5)
    pipe = Pipeline.from_pretrained(f["folder"])
    pipe.load_lora(path, scale=0.5)
    theirs, ours = _fused_weights(ref, pipe.model), weights(pipe.model)
    assert max((ours[k] - theirs[k]).abs().max().item() for k in theirs if k in ours) <= 1e-6


def test_openclip_fused_in_proj_equals_the_three_projections(files, tmp_path):
    """SD2 text-encoder LoRAs in OpenCLIP naming: the attn.in_proj update (3W x r up) lands on q, k, v."""
    f = files["sd2"]
    g = torch.Generator().manual_seed(5)
    down, up = torch.randn(4, 32, generator=g) * 0.1, torch.randn(96, 4, generator=g) * 0.1
    fused = {"lora_te_model_transformer_resblocks_1_attn_in_proj.lora_down.weight": down,
             "lora_te_model_transformer_resblocks_1_attn_in_proj.lora_up.weight": up,
             "lora_te_model_transformer_resblocks_1_attn_in_proj.alpha": torch.tensor(2.0)}
    split = {}
    for i, x in enumerate("qkv"):
        name = f"lora_te_text_model_encoder_layers_1_self_attn_{x}_proj"
        split |= {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up[32 * i: 32 * (i + 1)],
                  f"{name}.alpha": torch.tensor(2.0)}
    pipe = Pipeline.from_pretrained(f["folder"])
    pipe.load_lora(save_tensors(tmp_path / "fused.safetensors", fused), 0.9)
    a = weights(pipe.model)
    pipe.unload_loras()
    pipe.load_lora(save_tensors(tmp_path / "split.safetensors", split), 0.9)
    b = weights(pipe.model)
    assert_same_bits(a, b)
    q = pipe.model.text_encoder.encoder.layers[1].self_attn.q_proj.weight.clone()
    pipe.unload_loras()
    assert (q - pipe.model.text_encoder.encoder.layers[1].self_attn.q_proj.weight).abs().max() > 1e-3
