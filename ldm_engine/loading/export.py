"""Writing a model as one original-layout safetensors file that carries its own config."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..models.configs import LDMConfig, to_dict

CONFIG_KEY = "ldm_engine_config"


def save_single_file(path: str | Path, cfg: LDMConfig, unet, vae, text_encoder=None, class_embedder=None,
                     dtype: torch.dtype | None = None, cond_stage=None) -> None:
    """Keys as the original checkpoints write them; the config travels in the safetensors metadata, so
    load_checkpoint(path) needs no config argument."""
    from safetensors.torch import save_file

    sd = {"model.diffusion_model." + k: v for k, v in unet.state_dict().items()}
    sd |= {"first_stage_model." + k: v for k, v in vae.state_dict().items()}
    if text_encoder is not None:  # the LDM BERT transformer's keys sit under `transformer.`, CLIP's under text_model.
        prefix = "cond_stage_model.transformer." + ("" if hasattr(text_encoder, "token_emb") else "text_model.")
        sd |= {prefix + k: v for k, v in text_encoder.state_dict().items()}
    if class_embedder is not None:
        sd |= {"cond_stage_model." + k: v for k, v in class_embedder.state_dict().items()}
    if cond_stage is not None:  # e.g. semantic synthesis's SpatialRescaler (cond_stage_model.channel_mapper.*)
        sd |= {"cond_stage_model." + k: v for k, v in cond_stage.state_dict().items()}
    sd = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous() for k, v in sd.items()}
    save_file(sd, str(path), metadata={CONFIG_KEY: json.dumps(to_dict(cfg))})
