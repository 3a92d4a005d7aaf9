"""Architecture detection: an LDMConfig read off the key names and tensor shapes of an original-layout
checkpoint (component state dicts with their prefixes already stripped)."""
from __future__ import annotations

import logging
import re

import torch

from ..models.configs import AutoencoderConfig, LDMConfig, ScheduleConfig, TextEncoderConfig, UNetConfig
from . import bert_keys
from .errors import CheckpointError

log = logging.getLogger(__name__)
SD_SCHEDULE = ScheduleConfig()
LDM_SCHEDULE = ScheduleConfig(beta_start=0.0015, beta_end=0.0195)
UPSCALER_SCHEDULE = ScheduleConfig(beta_start=0.0001, beta_end=0.02)


def _indices(sd, pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m[1]) for k in sd if (m := rx.match(k))})


def _need(sd, key: str, what: str) -> torch.Tensor:
    if key not in sd:
        raise CheckpointError(f"cannot detect the {what}: key {key!r} is missing")
    return sd[key]


def detect_unet(sd: dict[str, torch.Tensor]) -> UNetConfig:
    conv_in = _need(sd, "input_blocks.0.0.weight", "UNet")
    mc, in_ch = conv_in.shape[0], conv_in.shape[1]
    out_ch = _need(sd, "out.2.weight", "UNet").shape[0]
    # Each output level has num_res_blocks + 1 blocks, the last of which (except at the top level) ends
    # with an upsampler: an `N.conv` or, with resblock_updown, a second ResBlock (`N.in_layers`).
    out_blocks = _indices(sd, r"output_blocks\.(\d+)\.")
    up_rx = re.compile(r"output_blocks\.(\d+)\.[12]\.(conv|in_layers)\.")
    ups = sorted({int(m[1]) for k in sd if (m := up_rx.match(k))})
    nres = ups[0] if ups else len(out_blocks) - 1
    updown = any(m[2] == "in_layers" for k in sd if (m := up_rx.match(k)))
    mults, attn, attn_block = [], [], {}
    for level in range(len(out_blocks) // (nres + 1)):
        first = 1 + level * (nres + 1)
        mults.append(_need(sd, f"input_blocks.{first}.0.in_layers.2.weight", "UNet").shape[0] // mc)
        if any(k.startswith(f"input_blocks.{first}.1.") for k in sd):
            attn.append(2 ** level)
            attn_block[level] = first
    emb_out = _need(sd, "input_blocks.1.0.emb_layers.1.weight", "UNet").shape[0]
    spatial = any(".transformer_blocks." in k for k in sd)
    cfg = UNetConfig(in_channels=in_ch, out_channels=out_ch, model_channels=mc, channel_mult=tuple(mults),
                     num_res_blocks=nres, attention_resolutions=tuple(attn), use_spatial_transformer=spatial,
                     context_dim=None, use_scale_shift_norm=emb_out == 2 * mults[0] * mc, resblock_updown=updown)
    if "time_embed_cond.weight" in sd:  # LCM-distilled: projects the guidance embedding onto the timestep's
        cfg.time_cond_proj_dim = sd["time_embed_cond.weight"].shape[1]
    if "label_emb.weight" in sd:
        cfg.num_classes = sd["label_emb.weight"].shape[0]
    elif any(k.startswith("label_emb.") for k in sd):
        raise CheckpointError("this UNet has a projection class embedding (SDXL-style), which is not supported")
    if spatial:
        first = next(k for k in sd if ".transformer_blocks." in k).split(".transformer_blocks.")[0]
        cfg.transformer_depth = len(_indices(sd, re.escape(first) + r"\.transformer_blocks\.(\d+)\."))
        cfg.context_dim = next(v.shape[1] for k, v in sd.items() if k.endswith("attn2.to_k.weight"))
        cfg.use_linear_in_transformer = sd[first + ".proj_in.weight"].ndim == 2
        # attn1 keyed on the context (not on its own width) marks a level without self-attention
        no_self = [level in attn_block and sd[f"input_blocks.{attn_block[level]}.1.transformer_blocks.0.attn1.to_k.weight"]
                   .shape[1] != sd[f"input_blocks.{attn_block[level]}.1.transformer_blocks.0.attn1.to_q.weight"].shape[1]
                   for level in range(len(mults))]
        cfg.disable_self_attentions = tuple(no_self) if any(no_self) else None
    # Head counts leave no trace in the shapes; use each family's convention.
    if cfg.context_dim in (768, 1280):  # SD1, and the LDM text-to-image txt2img-f8-large (1280-wide BERT)
        cfg.num_heads = 8
    elif cfg.context_dim == 1024 or not spatial:
        cfg.num_head_channels = 64 if spatial else 32
    else:
        cfg.num_head_channels = 32
    return cfg


def detect_vae(sd: dict[str, torch.Tensor]) -> AutoencoderConfig:
    conv_in = _need(sd, "encoder.conv_in.weight", "autoencoder")
    ch = conv_in.shape[0]
    levels = _indices(sd, r"encoder\.down\.(\d+)\.")
    mult = tuple(_need(sd, f"encoder.down.{i}.block.0.conv2.weight", "autoencoder").shape[0] // ch for i in levels)
    vq = "quantize.embedding.weight" in sd
    quant = _need(sd, "quant_conv.weight", "autoencoder").shape[0]
    return AutoencoderConfig(
        kind="vq" if vq else "kl", in_channels=conv_in.shape[1], out_ch=_need(sd, "decoder.conv_out.weight", "autoencoder").shape[0],
        ch=ch, ch_mult=mult, num_res_blocks=len(_indices(sd, r"encoder\.down\.0\.block\.(\d+)\.")),
        z_channels=_need(sd, "decoder.conv_in.weight", "autoencoder").shape[1],
        embed_dim=quant if vq else quant // 2, n_embed=sd["quantize.embedding.weight"].shape[0] if vq else None,
        attn_resolutions=tuple(256 // 2 ** i for i in levels if any(k.startswith(f"encoder.down.{i}.attn.") for k in sd)),
        attn_type="vanilla" if "encoder.mid.attn_1.q.weight" in sd else "none",  # attn_type none: no attention weights
    )


def detect_text_encoder(sd: dict[str, torch.Tensor], openclip: bool) -> TextEncoderConfig:
    tok = _need(sd, "embeddings.token_embedding.weight", "text encoder")
    width = tok.shape[1]
    return TextEncoderConfig(
        vocab_size=tok.shape[0], width=width, heads=max(1, width // 64),
        max_length=_need(sd, "embeddings.position_embedding.weight", "text encoder").shape[0],
        layers=len(_indices(sd, r"encoder\.layers\.(\d+)\.")),
        intermediate_size=_need(sd, "encoder.layers.0.mlp.fc1.weight", "text encoder").shape[0],
        act="gelu" if openclip else "quick_gelu", output_layer=-2 if openclip else -1,
        pad_token_id=0 if openclip else 49407,
    )


def detect_config(unet_sd, vae_sd, text_sd, openclip: bool, class_sd, name: str) -> LDMConfig:
    unet, vae = detect_unet(unet_sd), detect_vae(vae_sd)
    if "token_emb.weight" in text_sd:  # the LDM BERT transformer; its models' settings are not in the weights
        text = bert_keys.detect_bert(text_sd)
        return LDMConfig(name=name, unet=unet, vae=vae, text_encoder=text, **bert_keys.model_settings(text, vae))
    text = detect_text_encoder(text_sd, openclip) if text_sd else None
    if text is not None:
        cond, classes = "text", None
    elif class_sd:
        cond, classes = "class", _need(class_sd, "embedding.weight", "class embedder").shape[0]
    else:
        cond, classes = "none", None
    cfg = LDMConfig(name=name, unet=unet, vae=vae, text_encoder=text, conditioning=cond, num_classes=classes,
                    schedule=SD_SCHEDULE if text else LDM_SCHEDULE, scale_factor=0.18215 if text else 1.0)
    if unet.in_channels == 9:
        cfg.task = "inpaint"
    elif unet.in_channels == 5 and openclip:  # SD 2 depth-to-image (512-depth-ema): eps-prediction, 512 px
        cfg.task = "depth"
    elif unet.in_channels == 7 and unet.num_classes:
        cfg.task, cfg.prediction_type, cfg.scale_factor = "upscale", "v", 0.08333
        cfg.schedule = UPSCALER_SCHEDULE
    elif cond != "text":
        cfg.task = "class" if cond == "class" else "unconditional"
    if openclip and cfg.task == "txt2img":
        log.warning("SD2 checkpoint: the prediction type is not stored in the weights; assuming v-prediction "
                    "(sd-2.1-v, 768px). Pass config='sd-2.1-base' for the 512px eps model.")
        cfg.prediction_type, cfg.sample_size = "v", 96
    cfg.sample_size = cfg.sample_size if cfg.task != "upscale" else 128
    return cfg
