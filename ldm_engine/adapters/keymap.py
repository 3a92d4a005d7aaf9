"""Where each adapter module lands in the reference model: one table of every name a file may use.

The UNet is in the original layout (`input_blocks.1.1.proj_in`); files name its modules either that way
(kohya original-layout keys `lora_unet_input_blocks_1_1_proj_in`) or in diffusers' layout
(`lora_unet_down_blocks_0_attentions_0_proj_in`, PEFT `unet.down_blocks.0.attentions.0.proj_in`). The
diffusers names are found by running the loader's own diffusers -> original key map
(loading/keymaps.py) over the block names a diffusers UNet of this config has, so both layouts agree by
construction. The text encoder has the transformers CLIPTextModel layout for SD1 and SD2 alike; files
may also use OpenCLIP names (`..._resblocks_N_attn_in_proj`), whose fused q/k/v projection lands on the
three stacked projections. The autoencoder is never a target.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..loading.keymaps import diffusers_unet_to_original
from ..models import CLIPTextEncoder, UNetModel


@dataclass(frozen=True)
class Target:
    """One adapted weight: `params` are (component, parameter name) pairs whose weights, stacked along
    the output axis, form the matrix the adapter changes (three for a fused q/k/v projection)."""

    params: tuple[tuple[str, str], ...]
    shape: tuple[int, ...]  # of the stacked weight
    pad_channels: bool = False  # the UNet's first conv: an inpainting model has more input channels

    @property
    def component(self) -> str:
        return self.params[0][0]

    @property
    def name(self) -> str:
        return "+".join(p for _, p in self.params)


def _weights(module: nn.Module) -> dict[str, tuple[int, ...]]:
    """{module name: weight shape} of the Linear and Conv2d layers (the layers adapters change)."""
    return {name: tuple(m.weight.shape) for name, m in module.named_modules()
            if isinstance(m, (nn.Linear, nn.Conv2d))}


def _diffusers_names(unet_cfg) -> dict[str, str]:
    """{diffusers module name: original-layout module name} for a UNet of this config, from the loader's map."""
    n, per = len(unet_cfg.channel_mult), unet_cfg.num_res_blocks
    res_leaves = ("conv1", "conv2", "time_emb_proj", "conv_shortcut")
    blocks = []  # (diffusers block prefix, is a resnet)
    for i in range(n):
        blocks += [(f"down_blocks.{i}.resnets.{j}", True) for j in range(per)]
        blocks += [(f"down_blocks.{i}.attentions.{j}", False) for j in range(per)]
        if i < n - 1:
            blocks.append((f"down_blocks.{i}.downsamplers.0.conv", False))
        blocks += [(f"up_blocks.{i}.resnets.{j}", True) for j in range(per + 1)]
        blocks += [(f"up_blocks.{i}.attentions.{j}", False) for j in range(per + 1)]
        if i < n - 1:
            blocks.append((f"up_blocks.{i}.upsamplers.0.conv", False))
    blocks += [("mid_block.resnets.0", True), ("mid_block.resnets.1", True), ("mid_block.attentions.0", False)]
    blocks += [(name, False) for name in ("conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2",
                                          "class_embedding")]
    probe = "__leaf__"  # a sub-name the map passes through unchanged: tells where a block's inside lands
    keys = []
    for prefix, is_res in blocks:
        keys += [f"{prefix}.{leaf}.weight" for leaf in res_leaves] if is_res else [f"{prefix}.weight",
                                                                                   f"{prefix}.{probe}.weight"]
    attn_levels = [2 ** (n - 1 - i) in unet_cfg.attention_resolutions for i in range(n)]
    names = {}
    for key in keys:  # one at a time: each result pairs with its own source name
        (dst,) = diffusers_unet_to_original({key: None}, per, attn_levels)
        names[key.removesuffix(".weight")] = dst.removesuffix(".weight")
    return names


def _unet_aliases(unet_cfg, weights: dict[str, tuple]) -> dict[str, str]:
    """{every name a file may give: original-layout module name}."""
    aliases = {}
    for name in weights:
        aliases["lora_unet_" + name.replace(".", "_")] = name
    probe = ".__leaf__"
    for src, dst in _diffusers_names(unet_cfg).items():
        if src.endswith(probe):  # a block whose inside keeps its names (attentions, ...): map each layer inside
            src, dst = src.removesuffix(probe), dst.removesuffix(probe)
            pairs = [(src + name[len(dst):], name) for name in weights if name.startswith(dst + ".")]
        else:
            pairs = [(src, dst)] if dst in weights else []
        for d, o in pairs:
            for alias in (d, "unet." + d, "lora_unet_" + d.replace(".", "_")):
                aliases.setdefault(alias, o)
    return aliases


_OPENCLIP_PREFIXES = ("lora_te_", "lora_te_model_", "lora_te_wrapped_model_", "lora_te_cond_stage_model_model_")


def _text_aliases(weights: dict[str, tuple], layers: int) -> dict[str, tuple[str, ...]]:
    aliases: dict[str, tuple[str, ...]] = {}
    for name in weights:
        under = name.replace(".", "_")
        for alias in ("lora_te_text_model_" + under, "lora_te1_text_model_" + under, "text_encoder." + name,
                      "text_encoder.text_model." + name, "text_model." + name, name):
            aliases[alias] = (name,)
    # OpenCLIP layout (SD2 checkpoints, A1111's names for them): attn.in_proj is q, k, v stacked
    for i in range(layers):
        pre = f"encoder.layers.{i}."
        parts = {"attn_in_proj": ("q_proj", "k_proj", "v_proj"), "attn_out_proj": ("out_proj",),
                 "attn_q_proj": ("q_proj",), "attn_k_proj": ("k_proj",), "attn_v_proj": ("v_proj",)}
        mapping = {k: tuple(pre + "self_attn." + p for p in v) for k, v in parts.items()}
        mapping |= {"mlp_c_fc": (pre + "mlp.fc1",), "mlp_c_proj": (pre + "mlp.fc2",)}
        for short, names in mapping.items():
            if all(n in weights for n in names):
                for prefix in _OPENCLIP_PREFIXES:
                    aliases[f"{prefix}transformer_resblocks_{i}_{short}"] = names
    return aliases


def build_targets(config) -> dict[str, Target]:
    """{module name as a file writes it: Target} for a model of this LDMConfig (built on the meta
    device: no memory, names and shapes only)."""
    table: dict[str, Target] = {}
    with torch.device("meta"):
        unet = UNetModel(config.unet)
        text = CLIPTextEncoder(config.text_encoder) if config.conditioning == "text" else None
    unet_w = _weights(unet)
    first_conv = "input_blocks.0.0"
    for alias, name in _unet_aliases(config.unet, unet_w).items():
        table[alias] = Target(((("unet", name + ".weight"),)), unet_w[name], pad_channels=name == first_conv)
    if text is not None:
        text_w = _weights(text)
        for alias, names in _text_aliases(text_w, config.text_encoder.layers).items():
            shapes = [text_w[n] for n in names]
            stacked = (sum(s[0] for s in shapes), *shapes[0][1:])
            table[alias] = Target(tuple(("text_encoder", n + ".weight") for n in names), stacked)
    return table


def resolve_parameter(root: nn.Module, name: str) -> torch.Tensor:
    """The live parameter `name` (reference naming) of `root`, looking through wrappers that modules
    swapped in from outside put around a reference layer (they hold it as a child, same parameters)."""
    *path, leaf = name.split(".")
    module = root
    for seg in path:
        children = module._modules
        if seg in children:
            module = children[seg]
            continue
        inner = [c for c in children.values() if c is not None and seg in c._modules]
        if len(inner) != 1:
            raise KeyError(f"no module {name!r} in the loaded {type(root).__name__}")
        module = inner[0]._modules[seg]
    return getattr(module, leaf)
