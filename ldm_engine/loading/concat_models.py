"""The LDM paper's VQ-f4 models conditioned by concatenation — super-resolution (bsr_sr), semantic synthesis
(semantic_synthesis256/512) and the big inpainting model (inpainting_big) — from their original files and
YAMLs: the task a checkpoint is, its SpatialRescaler, and the noise schedule it records.

Checkpoint keys: `model.diffusion_model.*` (the UNet; `input_blocks.0.0.weight` has latent + condition
channels), `first_stage_model.*` (VQ-f4), `cond_stage_model.channel_mapper.weight` (semantic synthesis only;
super-resolution's stage is an identity, inpainting's is the first stage itself, saved a second time under
`cond_stage_model.*` and ignored here), and the DDPM buffers `betas`, `alphas_cumprod`, ...
"""
from __future__ import annotations

import logging
import math

import torch

from ..models.configs import LDMConfig, ScheduleConfig, SpatialRescalerConfig
from ..models.spatial_rescaler import SpatialRescaler
from .errors import CheckpointError
from .modules import load_strict

log = logging.getLogger(__name__)

MAPPER_KEY = "cond_stage_model.channel_mapper.weight"
# the released models' schedules (linear_start, linear_end of their config.yaml), used when a file has no betas
SCHEDULES = {"superres": (0.0015, 0.0155), "semantic": (0.0015, 0.0205), "inpaint": (0.0015, 0.0205)}


def schedule_from_betas(betas: torch.Tensor | None, default: tuple[float, float]) -> ScheduleConfig:
    """The original's "linear" schedule (betas = linspace(sqrt(start), sqrt(end), T)^2) that the file's
    `betas` buffer was made with; `default` (start, end) when the file has none or another kind."""
    if betas is not None and betas.ndim == 1 and len(betas) > 1:
        start, end = round(float(betas[0]), 8), round(float(betas[-1]), 8)
        again = torch.linspace(start ** 0.5, end ** 0.5, len(betas), dtype=torch.float64) ** 2
        if torch.allclose(again, betas.double(), rtol=1e-4, atol=1e-8):
            return ScheduleConfig(beta_start=start, beta_end=end, num_train_timesteps=len(betas))
        log.warning("the checkpoint's betas are not a linear schedule; using linear %s..%s", *default)
    return ScheduleConfig(beta_start=default[0], beta_end=default[1])


def refine_detected(cfg: LDMConfig, sd: dict[str, torch.Tensor]) -> LDMConfig:
    """A config detected from a checkpoint's keys (detect_config) -> the concat model it is, if it is one:
    a VQ model without text or class conditioning whose UNet takes the latent plus a condition."""
    u, z = cfg.unet, cfg.vae.embed_dim
    if cfg.conditioning != "none" or cfg.vae.kind != "vq" or u.num_classes is not None or u.out_channels != z:
        return cfg
    mapper = sd.get(MAPPER_KEY)
    if mapper is not None:
        out, classes = mapper.shape[:2]
        if u.in_channels != z + out:
            raise CheckpointError(f"the SpatialRescaler maps to {out} channels but the UNet takes {u.in_channels} "
                                  f"(latent {z} + condition); the checkpoint is inconsistent")
        # the rescaled map must land on the latent: n halvings of the image size
        stages = int(math.log2(cfg.vae.downsampling_factor))
        cfg.spatial_rescaler = SpatialRescalerConfig(n_stages=stages, in_channels=classes, out_channels=out,
                                                     bias="cond_stage_model.channel_mapper.bias" in sd)
        cfg.task = "semantic"
    elif u.in_channels == 2 * z:
        cfg.task = "superres"
    elif u.in_channels == 2 * z + 1:
        cfg.task = "inpaint"
    else:
        return cfg
    if cfg.task in ("semantic", "inpaint"):  # head counts leave no trace in weights: the released configs' 8 heads
        u.num_heads, u.num_head_channels = 8, -1
    cfg.schedule = schedule_from_betas(sd.get("betas"), SCHEDULES[cfg.task])
    cfg.scale_factor = 1.0
    return cfg


def rescaler_weights(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len("cond_stage_model."):]: v for k, v in sd.items() if k.startswith("cond_stage_model.channel_mapper.")}


def build_cond_stage(cfg: LDMConfig, sd: dict[str, torch.Tensor] | None, source, dtype) -> SpatialRescaler | None:
    """The SpatialRescaler of a semantic synthesis model, filled from the checkpoint (`sd` None: random)."""
    if cfg.spatial_rescaler is None:
        return None
    if sd is None:
        return SpatialRescaler(cfg.spatial_rescaler).to(dtype).eval().requires_grad_(False)
    weights = rescaler_weights(sd)
    if not weights:
        raise CheckpointError(f"{source}: a semantic synthesis model needs its conditioning stage weights "
                              f"({MAPPER_KEY}); the file has none")
    return load_strict(lambda: SpatialRescaler(cfg.spatial_rescaler), weights, "SpatialRescaler", source, dtype)


def yaml_stage(params: dict, path) -> dict | None:
    """An original YAML's concat conditioning (`model.params`) -> the config fields it sets (task,
    spatial_rescaler), or None when the config is not one of these models."""
    cond = params.get("cond_stage_config")
    target = cond.get("target", "") if isinstance(cond, dict) else cond
    concat = params.get("conditioning_key", "concat" if params.get("concat_mode", True) else "crossattn") == "concat"
    key = params.get("cond_stage_key")
    if target == "torch.nn.Identity" and key == "LR_image":
        task = "superres"
    elif isinstance(target, str) and target.endswith("SpatialRescaler"):
        task = "semantic"
    elif target == "__is_first_stage__" and key == "masked_image":
        task = "inpaint"
    else:
        return None
    if not concat:
        raise CheckpointError(f"{path}: a {target} conditioning stage is concatenated to the latent; this config "
                              "sets another conditioning_key")
    out = {"task": task}
    if task == "semantic":
        p = cond.get("params", {})
        known = ("n_stages", "method", "multiplier", "in_channels", "out_channels", "bias")
        out["spatial_rescaler"] = SpatialRescalerConfig(**{k: p[k] for k in known if k in p})
    return out
