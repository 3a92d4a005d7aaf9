"""Reading ControlNet weights: original files (`control_model.*` keys or bare ones; .safetensors, or
.pth/.ckpt through torch.load(weights_only=True)) and diffusers `ControlNetModel` folders, whose keys are
renamed onto the original layout. The architecture comes from the model the ControlNet is loaded into;
the file's shapes are checked against it first, so a ControlNet for another model family is refused
with a message before any weight is used."""
from __future__ import annotations

import re
from pathlib import Path

import torch

from ..loading import CheckpointError
from ..loading import diffusers_config as dc
from ..loading.files import read_json, read_state_dict
from ..loading.keymaps import diffusers_unet_to_original
from ..loading.modules import load_strict
from ..models.configs import UNetConfig
from .model import ControlNet, ControlNetConfig

_FOLDER_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
                   "diffusion_pytorch_model.fp16.safetensors")
_CHECKPOINT_PREFIXES = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "conditioner.")
_LORA_MARKS = ("lora_unet_", "lora_te", ".lora_down.", ".lora_up.", ".lora_A.", ".lora_B.", "lora.down",
               ".hada_w1", ".lokr_w1")


def family(context_dim: int | None, linear_proj: bool) -> str:
    """A readable name of the model family a UNet / ControlNet encoder belongs to."""
    known = {768: "SD1", 1024: "SD2"}
    return f"{known.get(context_dim, 'model')} (context {context_dim}, {'linear' if linear_proj else 'conv'} proj_in)"


def _refuse_other_files(sd: dict, source) -> None:
    keys = list(sd)
    if any(k.startswith(_CHECKPOINT_PREFIXES) for k in keys) and not any("input_hint_block" in k for k in keys):
        raise CheckpointError(f"{source}: this is a Stable Diffusion checkpoint, not a ControlNet; load it with "
                              "Pipeline.from_pretrained and give the ControlNet file to load_controlnet")
    if any(mark in k for k in keys for mark in _LORA_MARKS):
        raise CheckpointError(f"{source}: this is a LoRA / LyCORIS file, not a ControlNet; load it with "
                              "pipe.load_lora")


def _hint_channels(sd: dict, source) -> tuple[tuple[int, ...], int]:
    """(widths, input channels) of the hint encoder from its convs `input_hint_block.{0,2,4,...}`."""
    idx = sorted({int(m[1]) for k in sd if (m := re.fullmatch(r"input_hint_block\.(\d+)\.weight", k))})
    if len(idx) < 2 or idx != list(range(0, 2 * len(idx), 2)):
        raise CheckpointError(f"{source}: the hint encoder input_hint_block has convs {idx}; expected 0, 2, 4, ...")
    widths = [sd[f"input_hint_block.{i}.weight"].shape[0] for i in idx[:-1]]
    # conv_in, then per step a same-width conv and a strided one: (w0, w0, w1, w1, w2, ...)
    chans = tuple(widths[0::2])
    expected = [chans[0]] + [w for a, b in zip(chans[:-1], chans[1:]) for w in (a, b)]
    if widths != expected:
        raise CheckpointError(f"{source}: hint encoder widths {widths} are not in the ControlNet pattern {expected}")
    return chans, sd["input_hint_block.0.weight"].shape[1]


def check_fits(sd: dict, unet: UNetConfig, source) -> None:
    """Refuse a ControlNet whose encoder differs from the UNet's: its residuals would not fit the skips,
    or its cross-attention would read another text encoder's context."""
    mc = sd["input_blocks.0.0.weight"].shape[0]
    to_k = [v for k, v in sd.items() if k.endswith("attn2.to_k.weight")]
    ctx = to_k[0].shape[1] if to_k else None
    proj = next((v for k, v in sd.items() if k.endswith(".proj_in.weight")), None)
    linear = proj is not None and proj.ndim == 2
    if unet.use_spatial_transformer and (ctx != unet.context_dim or (proj is not None and linear != unet.use_linear_in_transformer)):
        raise CheckpointError(f"{source}: this ControlNet is for {family(ctx, linear)} models, the loaded model is "
                              f"{family(unet.context_dim, unet.use_linear_in_transformer)}; use a ControlNet made "
                              "for this model's family")
    if mc != unet.model_channels:
        raise CheckpointError(f"{source}: this ControlNet has {mc} base channels, the loaded UNet "
                              f"{unet.model_channels}; use a ControlNet made for this model")
    n_in = len({int(m[1]) for k in sd if (m := re.match(r"input_blocks\.(\d+)\.", k))})
    n_unet = ControlNetConfig(unet).num_residuals - 1
    if n_in != n_unet:
        raise CheckpointError(f"{source}: this ControlNet has {n_in} input blocks, the loaded UNet {n_unet}; "
                              "use a ControlNet made for this model")


def original_controlnet(sd: dict, unet: UNetConfig, source, dtype=torch.float32) -> ControlNet:
    """A ControlNet from original-layout keys (`control_model.` prefix removed or absent), shaped like `unet`."""
    _refuse_other_files(sd, source)
    if any(k.startswith("control_model.") for k in sd):
        sd = {k[len("control_model."):]: v for k, v in sd.items() if k.startswith("control_model.")}
    if any(k.startswith("controlnet_cond_embedding.") for k in sd):
        raise CheckpointError(f"{source}: a ControlNet in the diffusers key layout without its config; pass the "
                              "folder that holds it with its config.json")
    if "input_hint_block.0.weight" not in sd or "zero_convs.0.0.weight" not in sd or "input_blocks.0.0.weight" not in sd:
        raise CheckpointError(f"{source}: not a ControlNet (no input_hint_block / zero_convs / input_blocks keys)")
    check_fits(sd, unet, source)
    hint, hint_in = _hint_channels(sd, source)
    cfg = ControlNetConfig.for_unet(unet, sd["input_blocks.0.0.weight"].shape[1], hint_channels=hint,
                                    hint_in_channels=hint_in)
    return load_strict(lambda: ControlNet(cfg), sd, "ControlNet", source, dtype)


def diffusers_controlnet_to_original(sd: dict, layers_per_block: int) -> dict:
    """diffusers ControlNetModel keys -> the original layout: the encoder as the UNet's down blocks,
    controlnet_cond_embedding -> input_hint_block, controlnet_down_blocks.N -> zero_convs.N.0,
    controlnet_mid_block -> middle_block_out.0."""
    n_blocks = len({int(m[1]) for k in sd if (m := re.match(r"controlnet_cond_embedding\.blocks\.(\d+)\.", k))})
    own, rest = {}, {}
    for key, value in sd.items():
        if m := re.fullmatch(r"controlnet_cond_embedding\.(conv_in|conv_out|blocks\.(\d+))\.(.+)", key):
            i = 0 if m[1] == "conv_in" else 2 * (n_blocks + 1) if m[1] == "conv_out" else 2 * (int(m[2]) + 1)
            own[f"input_hint_block.{i}.{m[3]}"] = value
        elif m := re.fullmatch(r"controlnet_down_blocks\.(\d+)\.(.+)", key):
            own[f"zero_convs.{m[1]}.0.{m[2]}"] = value
        elif m := re.fullmatch(r"controlnet_mid_block\.(.+)", key):
            own[f"middle_block_out.0.{m[1]}"] = value
        else:
            rest[key] = value
    return own | diffusers_unet_to_original(rest, layers_per_block, [])


def folder_weights(folder: Path) -> Path | None:
    """The weights file of a diffusers ControlNet folder (safetensors first)."""
    return next((folder / w for w in _FOLDER_WEIGHTS if (folder / w).is_file()), None)


def diffusers_controlnet(folder: Path, unet: UNetConfig, dtype=torch.float32) -> ControlNet:
    cfg_file = folder / "config.json"
    if (folder / "model_index.json").is_file():
        raise CheckpointError(f"{folder}: this is a whole diffusers model folder, not a ControlNet; load it with "
                              "Pipeline.from_pretrained")
    if not cfg_file.is_file():
        raise CheckpointError(f"{folder}: not a diffusers ControlNet folder (no config.json)")
    c = read_json(cfg_file)
    if c.get("_class_name") != "ControlNetModel":
        raise CheckpointError(f"{folder}: holds a {c.get('_class_name')!r}, not a ControlNetModel")
    if c.get("controlnet_conditioning_channel_order", "rgb") != "rgb":
        raise CheckpointError(f"{folder}: control images in {c['controlnet_conditioning_channel_order']!r} order are "
                              "not supported (rgb is)")
    weights = folder_weights(folder)
    if weights is None:
        raise CheckpointError(f"{folder}: no weights file (looked for {', '.join(_FOLDER_WEIGHTS)})")
    # the encoder's settings are a UNet's; up blocks mirror the down blocks
    up = ["CrossAttnUpBlock2D" if "CrossAttn" in t else "UpBlock2D" for t in reversed(c["down_block_types"])]
    ucfg = dc.unet_config({**c, "up_block_types": up}, str(folder))
    sd = diffusers_controlnet_to_original(read_state_dict(weights), ucfg.num_res_blocks)
    check_fits(sd, unet, folder)
    cfg = ControlNetConfig(ucfg, tuple(c.get("conditioning_embedding_out_channels") or (16, 32, 96, 256)),
                           c.get("conditioning_channels", 3), bool(c.get("global_pool_conditions", False)))
    if ucfg.channel_mult != unet.channel_mult or ucfg.num_res_blocks != unet.num_res_blocks:
        raise CheckpointError(f"{folder}: this ControlNet's levels {ucfg.channel_mult} x {ucfg.num_res_blocks} differ "
                              f"from the loaded UNet's {unet.channel_mult} x {unet.num_res_blocks}")
    return load_strict(lambda: ControlNet(cfg), sd, "ControlNet", folder, dtype)


def read_controlnet(path, unet: UNetConfig, dtype=torch.float32) -> ControlNet:
    """A ControlNet for a UNet of config `unet` from a file or diffusers folder (see the module docstring)."""
    path = Path(path)
    if path.is_dir():
        return diffusers_controlnet(path, unet, dtype)
    return original_controlnet(read_state_dict(path), unet, path, dtype)
