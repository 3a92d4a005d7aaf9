"""Original inference YAML (`model: {target, params}` of the CompVis / Stability repos) -> LDMConfig."""
from __future__ import annotations

from dataclasses import fields
from pathlib import Path

from ..models.configs import AutoencoderConfig, LDMConfig, ScheduleConfig, TextEncoderConfig, UNetConfig
from .errors import CheckpointError

_OPENCLIP_H = dict(width=1024, layers=24, heads=16, intermediate_size=4096, act="gelu", pad_token_id=0)


def _pick(cls, params: dict) -> dict:
    names = {f.name for f in fields(cls)}
    return {k: (tuple(v) if isinstance(v, list) else v) for k, v in params.items() if k in names}


def config_from_yaml(path: str | Path) -> LDMConfig:
    import yaml

    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise CheckpointError(f"{path}: cannot read the YAML config ({e})") from None
    model = doc.get("model") if isinstance(doc, dict) else None
    params = model.get("params") if isinstance(model, dict) else None
    if not isinstance(params, dict) or "unet_config" not in params or "first_stage_config" not in params:
        raise CheckpointError(f"{path}: not a latent-diffusion config (expected model.params with unet_config "
                              f"and first_stage_config, as the original repos' inference YAMLs)")
    try:
        unet = UNetConfig(**_pick(UNetConfig, params["unet_config"].get("params", {})))
        fs = params["first_stage_config"]
        fsp = fs.get("params", {})
        kind = "vq" if "VQ" in fs.get("target", "") else "kl"
        vae = AutoencoderConfig(kind=kind, embed_dim=fsp.get("embed_dim", 4), n_embed=fsp.get("n_embed"),
                                **_pick(AutoencoderConfig, {k: v for k, v in fsp.get("ddconfig", {}).items()
                                                            if k not in ("embed_dim", "n_embed")}))
        cond = params.get("cond_stage_config")
        target = cond.get("target", "") if isinstance(cond, dict) else ""
        text, conditioning, classes = None, "none", None
        if "OpenCLIP" in target:
            layer = cond.get("params", {}).get("layer", "penultimate")
            text, conditioning = TextEncoderConfig(output_layer=-2 if layer == "penultimate" else -1, **_OPENCLIP_H), "text"
        elif "CLIP" in target:
            text, conditioning = TextEncoderConfig(), "text"
        elif "ClassEmbedder" in target:
            cp = cond.get("params", {})
            conditioning, classes = "class", cp.get("n_classes", 1000)
        elif cond not in (None, "__is_unconditional__"):
            raise CheckpointError(f"{path}: unsupported conditioning stage {target or cond!r}")
        pred = {"eps": "eps", "v": "v", "x0": "x0"}[params.get("parameterization", "eps")]
        beta = "scaled_linear" if params.get("beta_schedule", "linear") == "linear" else params["beta_schedule"]
        schedule = ScheduleConfig(beta_schedule=beta, beta_start=params.get("linear_start", 0.00085),
                                  beta_end=params.get("linear_end", 0.012), num_train_timesteps=params.get("timesteps", 1000))
        cfg = LDMConfig(name=path.stem, unet=unet, vae=vae, text_encoder=text, conditioning=conditioning,
                        num_classes=classes, scale_factor=float(params.get("scale_factor", 1.0)), prediction_type=pred,
                        schedule=schedule, sample_size=int(params.get("image_size", 64)))
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{path}: malformed latent-diffusion config ({type(e).__name__}: {e})") from None
    if unet.in_channels == 9:
        cfg.task = "inpaint"
    elif "Upscale" in model.get("target", ""):
        cfg.task = "upscale"
    elif conditioning != "text":
        cfg.task = "class" if conditioning == "class" else "unconditional"
    return cfg
