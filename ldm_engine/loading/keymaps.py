"""Key renaming onto the reference modules' layout (the original LDM / SD checkpoint layout).

diffusers -> original follows the block arithmetic of the original UNet: with L res blocks per level,
down level i's res block j is input block i*(L+1)+j+1 and its downsampler input block (i+1)*(L+1).
"""
from __future__ import annotations

import re

import torch

_UNET_RES = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
             "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out",
             "query": "q", "key": "k", "value": "v", "proj_attn": "proj_out"}


def _res(rest: str) -> str:
    name, _, tail = rest.partition(".")
    return f"{_UNET_RES.get(name, name)}.{tail}"


def diffusers_unet_to_original(sd: dict[str, torch.Tensor], layers_per_block: int,
                               up_has_attention: list[bool]) -> dict[str, torch.Tensor]:
    n = layers_per_block + 1
    out = {}
    for key, value in sd.items():
        new = key
        if m := re.fullmatch(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            i, j, rest = int(m[1]), int(m[2]), m[3]
            new = f"input_blocks.{i * n + j + 1}.0.{_res(rest)}"
        elif m := re.fullmatch(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", key):
            new = f"input_blocks.{int(m[1]) * n + int(m[2]) + 1}.1.{m[3]}"
        elif m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
            new = f"input_blocks.{(int(m[1]) + 1) * n}.0.op.{m[2]}"
        elif m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", key):
            new = f"middle_block.{2 * int(m[1])}.{_res(m[2])}"
        elif m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
            new = f"middle_block.1.{m[1]}"
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            new = f"output_blocks.{int(m[1]) * n + int(m[2])}.0.{_res(m[3])}"
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", key):
            new = f"output_blocks.{int(m[1]) * n + int(m[2])}.1.{m[3]}"
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
            i = int(m[1])
            new = f"output_blocks.{i * n + n - 1}.{2 if up_has_attention[i] else 1}.conv.{m[2]}"
        else:
            for src, dst in (("time_embedding.linear_1.", "time_embed.0."), ("time_embedding.linear_2.", "time_embed.2."),
                             ("conv_in.", "input_blocks.0.0."), ("conv_norm_out.", "out.0."), ("conv_out.", "out.2."),
                             ("class_embedding.", "label_emb."), ("time_embedding.cond_proj.", "time_embed_cond.")):
                if key.startswith(src):
                    new = dst + key[len(src):]
        out[new] = value
    return out


def diffusers_vae_to_original(sd: dict[str, torch.Tensor], num_levels: int) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in sd.items():
        new = key
        if m := re.fullmatch(r"(encoder|decoder)\.(down|up)_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            i = int(m[3]) if m[2] == "down" else num_levels - 1 - int(m[3])
            new = f"{m[1]}.{m[2]}.{i}.block.{m[4]}.{m[5].replace('conv_shortcut', 'nin_shortcut')}"
        elif m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
            new = f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
            new = f"decoder.up.{num_levels - 1 - int(m[1])}.upsample.conv.{m[2]}"
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
            new = f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)", key):
            new = f"{m[1]}.mid.attn_1.{_VAE_ATTN.get(m[2], m[2])}.{m[3]}"
            if m[3] == "weight" and value.ndim == 2:  # diffusers stores the 1x1 convs as linears
                value = value[:, :, None, None]
        elif m := re.fullmatch(r"(encoder|decoder)\.conv_norm_out\.(.+)", key):
            new = f"{m[1]}.norm_out.{m[2]}"
        out[new] = value
    return out


def openclip_text_to_reference(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """OpenCLIP text tower (`token_embedding`, `transformer.resblocks.N.attn.in_proj_weight`, ...) onto the
    transformers-style layout of CLIPTextEncoder; the fused q/k/v projection is split in three."""
    out = {}
    for key, value in sd.items():
        if m := re.fullmatch(r"transformer\.resblocks\.(\d+)\.(.+)", key):
            pre, rest = f"encoder.layers.{m[1]}.", m[2]
            if rest.startswith("attn.in_proj_"):
                kind = rest.rsplit("_", 1)[1]  # weight or bias
                for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                    out[f"{pre}self_attn.{name}.{kind}"] = part.contiguous()
                continue
            rest = (rest.replace("attn.out_proj", "self_attn.out_proj").replace("ln_1", "layer_norm1")
                    .replace("ln_2", "layer_norm2").replace("mlp.c_fc", "mlp.fc1").replace("mlp.c_proj", "mlp.fc2"))
            out[pre + rest] = value
        elif key == "token_embedding.weight":
            out["embeddings.token_embedding.weight"] = value
        elif key == "positional_embedding":
            out["embeddings.position_embedding.weight"] = value
        elif key.startswith("ln_final."):
            out["final_layer_norm." + key[len("ln_final."):]] = value
        # text_projection, logit_scale and the vision tower are not used by Stable Diffusion
    return out


def ema_weights(sd: dict[str, torch.Tensor], unet_prefix: str = "model.diffusion_model.") -> dict[str, torch.Tensor] | None:
    """The EMA copy of the UNet weights that original checkpoints keep as `model_ema.<name without dots>`,
    keyed like the live weights; None when the file has no (complete) EMA copy."""
    ema = {}
    for key in sd:
        if key.startswith(unet_prefix):
            name = "model_ema." + ("diffusion_model." + key[len(unet_prefix):]).replace(".", "")
            if name not in sd:
                return None
            ema[key] = sd[name]
    return ema or None
