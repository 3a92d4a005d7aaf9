"""LoRA files made by peft / diffusers themselves on the tiny SD folders, converted to the kohya naming
schemes by the formulas A1111 documents; and the key map: every module a diffusers UNet / CLIP text
model has must land on the reference weight of the same shape. The helpers are used by the other
tests/test_lora_*.py files."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ldm_engine.adapters import build_targets
from ldm_engine.loading import load_checkpoint
from ldm_engine.loading.keymaps import diffusers_unet_to_original

# every Linear / Conv2d a LoRA trainer may adapt (LoCon style: the ResBlock and resampler convs too)
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                "conv2", "conv_shortcut", "time_emb_proj", "conv"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


def peft_lora(folder: Path, seed: int = 0, rank: int = 4, alpha: float = 8.0, text_alpha: float = 4.0,
              text: bool = True, unet_targets=UNET_TARGETS):
    """(unet state dict, text encoder state dict, unet LoraConfig, text LoraConfig): random LoRA weights
    (PEFT's init_lora_weights=False: A and B both random) on the folder's diffusers modules."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig, get_peft_model_state_dict
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    ucfg = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=False, target_modules=list(unet_targets))
    unet.add_adapter(ucfg)
    usd = {k: v.detach().clone() for k, v in get_peft_model_state_dict(unet).items()}
    tsd, tcfg = {}, None
    if text:
        te = CLIPTextModel.from_pretrained(folder / "text_encoder")
        tcfg = LoraConfig(r=rank, lora_alpha=text_alpha, init_lora_weights=False, target_modules=TEXT_TARGETS)
        te.add_adapter(tcfg)
        tsd = {k: v.detach().clone() for k, v in get_peft_model_state_dict(te).items()}
    return usd, tsd, ucfg, tcfg


def save_peft(path: Path, usd, tsd, ucfg=None, tcfg=None) -> Path:
    """diffusers' own writer (StableDiffusionPipeline.save_lora_weights); configs given: their alphas go
    into the file's lora_adapter_metadata, else the file has none (alpha = rank)."""
    from diffusers import StableDiffusionPipeline

    StableDiffusionPipeline.save_lora_weights(
        path.parent, unet_lora_layers=usd, text_encoder_lora_layers=tsd or None, weight_name=path.name,
        unet_lora_adapter_metadata=ucfg.to_dict() if ucfg else None,
        text_encoder_lora_adapter_metadata=tcfg.to_dict() if tcfg and tsd else None)
    return path


_RES = {"conv1": "in_layers_2", "conv2": "out_layers_3", "time_emb_proj": "emb_layers_1",
        "conv_shortcut": "skip_connection"}


def original_layout(name: str, layers_per_block: int, up_attention: list[bool]) -> str:
    """A diffusers UNet module name -> the original (LDM / A1111) layout, by the block arithmetic of
    A1111's convert_diffusers_name_to_compvis, with n = layers_per_block + 1 layers per level."""
    n = layers_per_block + 1
    rules = [
        (r"down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)",
         lambda i, j, leaf: f"input_blocks.{1 + i * n + j}.0.{_RES[leaf]}"),
        (r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", lambda i, j, rest: f"input_blocks.{1 + i * n + j}.1.{rest}"),
        (r"down_blocks\.(\d+)\.downsamplers\.0\.conv", lambda i: f"input_blocks.{n * (i + 1)}.0.op"),
        (r"mid_block\.resnets\.(\d+)\.(\w+)", lambda j, leaf: f"middle_block.{2 * j}.{_RES[leaf]}"),
        (r"mid_block\.attentions\.0\.(.+)", lambda rest: f"middle_block.1.{rest}"),
        (r"up_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)", lambda i, j, leaf: f"output_blocks.{i * n + j}.0.{_RES[leaf]}"),
        (r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", lambda i, j, rest: f"output_blocks.{i * n + j}.1.{rest}"),
        (r"up_blocks\.(\d+)\.upsamplers\.0\.conv",
         lambda i: f"output_blocks.{i * n + n - 1}.{2 if up_attention[i] else 1}.conv"),
        (r"conv_in", lambda: "input_blocks.0.0"), (r"conv_out", lambda: "out.2"),
        (r"time_embedding\.linear_(\d)", lambda k: f"time_embed.{2 * k - 2}"),
    ]
    for pattern, make in rules:
        if m := re.fullmatch(pattern, name):
            return make(*[int(g) if g.isdigit() else g for g in m.groups()])
    raise ValueError(f"no rule for {name}")


def to_kohya(usd, tsd, unet_alpha: float | None, text_alpha: float | None, layout: str = "diffusers",
             layers_per_block: int = 2, up_attention=(False, True)) -> dict:
    """PEFT tensors -> a kohya file: lora_unet_<module with underscores>.lora_down.weight / .lora_up.weight
    / .alpha; the UNet in diffusers' module names or (layout 'original') the LDM layout's."""
    out = {}
    for prefix, sd, alpha in (("lora_unet_", usd, unet_alpha), ("lora_te_text_model_", tsd, text_alpha)):
        for key, value in sd.items():
            module, _, role = key.rpartition(".lora_")
            if layout == "original" and prefix == "lora_unet_":
                module = original_layout(module, layers_per_block, list(up_attention))
            name = prefix + module.replace(".", "_")
            out[f"{name}.lora_{'down' if role == 'A.weight' else 'up'}.weight"] = value.contiguous()
            if alpha is not None:
                out[f"{name}.alpha"] = torch.tensor(float(alpha))
    return out


def save_tensors(path: Path, sd: dict, metadata: dict | None = None) -> Path:
    save_file({k: v.contiguous().clone() for k, v in sd.items()}, str(path), metadata=metadata)
    return path


def weights(model) -> dict[str, torch.Tensor]:
    """Every tensor of the model's components, cloned: to compare bit for bit."""
    return {f"{part}.{k}": v.detach().clone() for part in ("unet", "text_encoder", "vae")
            if getattr(model, part) is not None for k, v in getattr(model, part).state_dict().items()}


def assert_same_bits(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


# ---- the key map -------------------------------------------------------------------------------------


@pytest.mark.parametrize("style", ["sd1", "sd2"])
def test_every_diffusers_module_lands_on_its_reference_weight(style, sd1_folder, sd2_folder):
    """The diffusers module names (kohya underscores and PEFT dots) against the loader's own state-dict
    map, and the original-layout names by A1111's block arithmetic."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    folder = sd1_folder if style == "sd1" else sd2_folder
    model = load_checkpoint(folder)
    table = build_targets(model.config)
    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    ucfg = model.config.unet
    n = len(ucfg.channel_mult)
    up_attention = [2 ** (n - 1 - i) in ucfg.attention_resolutions for i in range(n)]
    checked = 0
    for name, module in unet.named_modules():
        if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        (expected,) = diffusers_unet_to_original({f"{name}.weight": None}, ucfg.num_res_blocks, up_attention)
        for alias in (name, "unet." + name, "lora_unet_" + name.replace(".", "_"),
                      "lora_unet_" + original_layout(name, ucfg.num_res_blocks, up_attention).replace(".", "_")):
            target = table[alias]
            assert target.params == (("unet", expected),), alias
            assert target.shape[0] == module.weight.shape[0] and target.shape[1] == module.weight.shape[1]
        checked += 1
    assert checked >= 60
    te = CLIPTextModel.from_pretrained(folder / "text_encoder")
    for name, module in te.named_modules():
        if isinstance(module, torch.nn.Linear):
            for alias in ("text_encoder." + name, "lora_te_text_model_" + name.replace(".", "_")):
                assert table[alias].params == (("text_encoder", name + ".weight"),)
                assert table[alias].shape == tuple(module.weight.shape)


def test_openclip_names_stack_q_k_v(sd2_folder):
    table = build_targets(load_checkpoint(sd2_folder).config)
    fused = table["lora_te_model_transformer_resblocks_1_attn_in_proj"]
    assert [p for _, p in fused.params] == [f"encoder.layers.1.self_attn.{x}_proj.weight" for x in "qkv"]
    assert fused.shape == (96, 32)
    fc1 = (("text_encoder", "encoder.layers.0.mlp.fc1.weight"),)
    assert table["lora_te_transformer_resblocks_0_mlp_c_fc"].params == fc1
    assert table["lora_te_model_transformer_resblocks_2_attn_out_proj"].shape == (32, 32)


def test_kernel_wrappers_are_seen_through():
    """Modules swapped in from outside (the Triton kernel wrappers) hold the reference layer as a child."""
    from ldm_engine.adapters.keymap import resolve_parameter

    inner = torch.nn.Linear(2, 3)
    wrapper = torch.nn.Module()
    wrapper.attn = torch.nn.Module()
    wrapper.attn.to_q = inner
    root = torch.nn.Module()
    root.block = wrapper
    assert resolve_parameter(root, "block.to_q.weight") is inner.weight
    with pytest.raises(KeyError, match="no module"):
        resolve_parameter(root, "block.to_x.weight")
