"""diffusers folders whose UNet is a `UNet2DModel` — the UNet of LDMSuperResolutionPipeline — onto the
reference UNet (the original LDM `UNetModel` with ADM attention blocks, no cross-attention).

Its resnets, down/upsamplers and time embedding carry UNet2DConditionModel's key names, so
keymaps.diffusers_unet_to_original renames them; its attention blocks keep q, k and v as separate linear
layers (`to_q`, `to_k`, `to_v`, `to_out.0`, `group_norm`), which are fused here into the original's 1x1
`qkv` conv in the legacy per-head order [q_h, k_h, v_h] for head h = 0, 1, ...
"""
from __future__ import annotations

import json
import logging
import re

import torch

from ..models.configs import LDMConfig, ScheduleConfig, UNetConfig
from . import diffusers_config as dc
from .errors import CheckpointError
from .keymaps import diffusers_unet_to_original, diffusers_vae_to_original

log = logging.getLogger(__name__)

# settings whose other values the reference UNet does not implement, with the value it has
_FIXED = {
    "time_embedding_type": "positional", "flip_sin_to_cos": True, "freq_shift": 0, "center_input_sample": False,
    "mid_block_type": "UNetMidBlock2D", "mid_block_scale_factor": 1, "downsample_padding": 1,
    "downsample_type": "conv", "upsample_type": "conv", "act_fn": "silu", "norm_eps": 1e-5,
    "resnet_time_scale_shift": "default", "add_attention": True, "class_embed_type": None,
    "attn_norm_num_groups": None, "time_embedding_dim": None, "dropout": 0.0,
}
_DOWN = {"DownBlock2D": False, "AttnDownBlock2D": True}
_UP = {"UpBlock2D": False, "AttnUpBlock2D": True}
_ATTN_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}  # older diffusers names


def unet2d_config(c: dict, where: str) -> UNetConfig:
    """A UNet2DModel config.json -> UNetConfig (ADM attention, no context)."""
    for key, ok in _FIXED.items():
        if c.get(key, ok) != ok:
            raise CheckpointError(f"{where}: unsupported UNet2DModel setting {key}={c[key]!r} "
                                  f"(the LDM UNet has {ok!r})")
    down, up = list(c.get("down_block_types", [])), list(c.get("up_block_types", []))
    if any(t not in _DOWN for t in down) or any(t not in _UP for t in up) or len(down) != len(up):
        raise CheckpointError(f"{where}: UNet2DModel blocks {down} / {up} are not supported (DownBlock2D, "
                              "AttnDownBlock2D, UpBlock2D, AttnUpBlock2D, as many up as down)")
    attn = tuple(2 ** i for i, t in enumerate(down) if _DOWN[t])
    if [_UP[t] for t in up] != [_DOWN[t] for t in reversed(down)]:
        raise CheckpointError(f"{where}: down and up blocks place attention differently ({down} vs {up}); the LDM "
                              "UNet is symmetric")
    chans = list(c["block_out_channels"])
    mc = chans[0]
    if any(ch % mc for ch in chans):
        raise CheckpointError(f"{where}: block_out_channels {chans} are not multiples of the first")
    head = c.get("attention_head_dim", 8)  # the width of each head (None: one head per block)
    if head is not None and any(ch % head for ch in chans):
        raise CheckpointError(f"{where}: attention_head_dim {head} does not divide the block widths {chans}")
    return UNetConfig(
        in_channels=c.get("in_channels", 3), out_channels=c.get("out_channels", 3), model_channels=mc,
        channel_mult=tuple(ch // mc for ch in chans), num_res_blocks=c.get("layers_per_block", 2),
        attention_resolutions=attn, num_heads=1 if head is None else 8, num_head_channels=head or -1,
        context_dim=None, use_spatial_transformer=False, num_classes=c.get("num_class_embeds"),
        norm_groups=c.get("norm_num_groups", 32))


def _fuse_attention(sd: dict[str, torch.Tensor], cfg: UNetConfig) -> dict[str, torch.Tensor]:
    """Separate q/k/v linears (C, C) of each attention block -> the original qkv conv (3C, C, 1) in the
    legacy per-head layout, group_norm -> norm, to_out.0 -> proj_out (C, C, 1)."""
    out, blocks = {}, {}
    for key, value in sd.items():
        m = re.fullmatch(r"(.+\.1)\.(group_norm|to_q|to_k|to_v|to_out\.0|query|key|value|proj_attn)\.(weight|bias)",
                         key)
        if m and key.startswith(("input_blocks.", "middle_block.", "output_blocks.")):
            blocks.setdefault(m[1], {})[f"{_ATTN_NAMES.get(m[2], m[2])}.{m[3]}"] = value
        else:
            out[key] = value
    for prefix, p in blocks.items():
        try:
            c = p["to_q.weight"].shape[0]
            heads, d = cfg.heads_for(c)
            for kind in ("weight", "bias"):
                q, k, v = (p[f"{n}.{kind}"].reshape(heads, d, -1) for n in ("to_q", "to_k", "to_v"))
                fused = torch.stack([q, k, v], dim=1).reshape(3 * c, -1)  # (3C, C) or (3C, 1)
                out[f"{prefix}.qkv.{kind}"] = fused[..., None] if kind == "weight" else fused[:, 0]
                proj = p[f"to_out.0.{kind}"]
                out[f"{prefix}.proj_out.{kind}"] = proj[..., None] if kind == "weight" else proj
                out[f"{prefix}.norm.{kind}"] = p[f"group_norm.{kind}"]
        except KeyError as e:
            raise CheckpointError(f"attention block {prefix}: missing {e.args[0]} (needs q, k, v, out projections "
                                  "with biases and a group norm)") from None
    return out


def unet2d_to_original(sd: dict[str, torch.Tensor], cfg: UNetConfig) -> dict[str, torch.Tensor]:
    n = len(cfg.channel_mult)
    up_has_attention = [2 ** (n - 1 - i) in cfg.attention_resolutions for i in range(n)]
    return _fuse_attention(diffusers_unet_to_original(sd, cfg.num_res_blocks, up_has_attention), cfg)


def unet2d_folder(folder, index: dict, cfg: LDMConfig | None, unet_c: dict, unet_sd, vae_c: dict, vae_sd,
                  vae_name: str, vae_class: str):
    """An LDMSuperResolutionPipeline folder -> (config, UNet and VQ weights in the original layout). The
    pipeline never scales latents (scale factor 1) and concatenates the low-res image to them."""
    pipeline = index.get("_class_name")
    if pipeline != "LDMSuperResolutionPipeline" or vae_class != "VQModel":
        raise CheckpointError(f"{folder}: a {pipeline} folder with a UNet2DModel and a {vae_class} is not supported "
                              "(an LDMSuperResolutionPipeline folder with a VQModel is)")
    ucfg = unet2d_config(unet_c, str(folder / "unet"))
    vcfg, _ = dc.vae_config(vae_c, str(folder / vae_name), "vq")
    if ucfg.in_channels != vcfg.embed_dim + 3 or ucfg.out_channels != vcfg.embed_dim:
        raise CheckpointError(f"{folder}: a super-resolution UNet takes the latent ({vcfg.embed_dim}) plus the RGB "
                              f"image and returns the latent; got in {ucfg.in_channels}, out {ucfg.out_channels}")
    if cfg is None:
        sched_file = folder / "scheduler" / "scheduler_config.json"
        schedule, pred, sampler = ScheduleConfig(beta_start=0.0015, beta_end=0.0155), "eps", "ddim"
        if sched_file.is_file():
            sched_c = json.loads(sched_file.read_text(encoding="utf-8"))
            schedule, pred = dc.schedule_config(sched_c, pipeline)
            sampler = dc.sampler_for_scheduler(sched_c) or "ddim"
            if sched_c.get("clip_sample"):
                log.warning("%s: its scheduler clips x0 to [-1, 1] (clip_sample); the samplers here do not", folder)
        size = unet_c.get("sample_size") or 64
        cfg = LDMConfig(name=folder.name, unet=ucfg, vae=vcfg, conditioning="none", scale_factor=1.0,
                        prediction_type=pred, schedule=schedule, sample_size=size if isinstance(size, int) else size[0],
                        task="superres", default_sampler=sampler)
    return cfg, unet2d_to_original(unet_sd, ucfg), diffusers_vae_to_original(vae_sd, len(vcfg.ch_mult))
