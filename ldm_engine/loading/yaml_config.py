"""Original inference YAML (`model: {target, params}` of the CompVis / Stability repos) -> LDMConfig."""
from __future__ import annotations

from dataclasses import fields
from pathlib import Path

from ..models.configs import AutoencoderConfig, BERTConfig, LDMConfig, ScheduleConfig, TextEncoderConfig, UNetConfig
from . import bert_keys
from .concat_models import yaml_stage
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
        # the original UNetModel's defaults where a config leaves them out: ADM attention, no cross-attention
        unet = UNetConfig(**{"use_spatial_transformer": False, "context_dim": None,
                             **_pick(UNetConfig, params["unet_config"].get("params", {}))})
        fs = params["first_stage_config"]
        fsp = fs.get("params", {})
        kind = "vq" if "VQ" in fs.get("target", "") else "kl"
        vae = AutoencoderConfig(kind=kind, embed_dim=fsp.get("embed_dim", 4), n_embed=fsp.get("n_embed"),
                                **_pick(AutoencoderConfig, {k: v for k, v in fsp.get("ddconfig", {}).items()
                                                            if k not in ("embed_dim", "n_embed")}))
        cond = params.get("cond_stage_config")
        target = cond.get("target", "") if isinstance(cond, dict) else ""
        text, conditioning, classes = None, "none", None
        concat = yaml_stage(params, path)  # super-resolution, semantic synthesis, LDM inpainting: concatenated
        if "OpenCLIP" in target:
            layer = cond.get("params", {}).get("layer", "penultimate")
            text, conditioning = TextEncoderConfig(output_layer=-2 if layer == "penultimate" else -1, **_OPENCLIP_H), "text"
        elif "CLIP" in target:
            text, conditioning = TextEncoderConfig(), "text"
        elif "ClassEmbedder" in target:
            cp = cond.get("params", {})
            conditioning, classes = "class", cp.get("n_classes", 1000)
        elif "BERTEmbedder" in target:  # the LDM text-to-image models, and layout2img over bounding-box tokens
            text = bert_keys.config_from_yaml(cond.get("params", {}), params.get("cond_stage_key"))
            conditioning = "text" if text.tokenizer else "layout"
        elif cond not in (None, "__is_unconditional__") and concat is None:
            raise CheckpointError(f"{path}: unsupported conditioning stage {target or cond!r}")
        pred = {"eps": "eps", "v": "v", "x0": "x0"}[params.get("parameterization", "eps")]
        beta = "scaled_linear" if params.get("beta_schedule", "linear") == "linear" else params["beta_schedule"]
        schedule = ScheduleConfig(beta_schedule=beta, beta_start=params.get("linear_start", 0.00085),
                                  beta_end=params.get("linear_end", 0.012), num_train_timesteps=params.get("timesteps", 1000))
        cfg = LDMConfig(name=path.stem, unet=unet, vae=vae, text_encoder=text, conditioning=conditioning,
                        num_classes=classes, scale_factor=float(params.get("scale_factor", 1.0)), prediction_type=pred,
                        schedule=schedule, sample_size=int(params.get("image_size", 64)),
                        guidance_scale=1.0 if isinstance(text, BERTConfig) else 7.5)  # as LDMTextToImagePipeline
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{path}: malformed latent-diffusion config ({type(e).__name__}: {e})") from None
    if unet.in_channels == 9:
        cfg.task = "inpaint"
    elif "Depth2Image" in model.get("target", "") or "depth_stage_config" in params:  # its MiDaS stage is not run
        if unet.in_channels != 5:
            raise CheckpointError(f"{path}: a depth-to-image config needs a UNet with 5 input channels (4 latent + "
                                  f"depth), got in_channels {unet.in_channels}")
        cfg.task = "depth"
    elif "Upscale" in model.get("target", ""):
        cfg.task = "upscale"
    elif conditioning == "layout":
        cfg.task = "layout"
    elif conditioning != "text":
        cfg.task = "class" if conditioning == "class" else "unconditional"
    if concat is not None:
        cfg.task, cfg.spatial_rescaler = concat["task"], concat.get("spatial_rescaler")
    return cfg
