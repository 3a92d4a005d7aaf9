"""diffusers / transformers `config.json` -> the reference configs. Features the reference does not
implement (SDXL add-embeddings, scale-shift norm, ...) are refused with a message, never ignored."""
from __future__ import annotations

from ..models.configs import AutoencoderConfig, ScheduleConfig, TextEncoderConfig, UNetConfig
from .errors import CheckpointError

_UNSUPPORTED_UNET = {
    "addition_embed_type": None, "encoder_hid_dim": None, "class_embed_type": None,
    "resnet_time_scale_shift": "default", "time_embedding_type": "positional", "conv_in_kernel": 3,
    "conv_out_kernel": 3, "dual_cross_attention": False, "only_cross_attention": False,
    "flip_sin_to_cos": True, "freq_shift": 0, "center_input_sample": False,
    "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": 1e-5, "timestep_post_act": None,
    "time_embedding_dim": None, "class_embeddings_concat": False,
}


def _as_list(v, n):
    return list(v) if isinstance(v, (list, tuple)) else [v] * n


def unet_config(c: dict, where: str) -> UNetConfig:
    for key, ok in _UNSUPPORTED_UNET.items():
        v = c.get(key, ok)
        if key == "only_cross_attention" and isinstance(v, list):
            continue  # per level: maps to disable_self_attentions
        if v != ok:
            raise CheckpointError(f"{where}: unsupported UNet setting {key}={v!r} (the LDM/SD UNet has {ok!r})")
    chans = list(c["block_out_channels"])
    mc = chans[0]
    if any(ch % mc for ch in chans):
        raise CheckpointError(f"{where}: block_out_channels {chans} are not multiples of the first")
    lpb = c.get("layers_per_block", 2)
    if not isinstance(lpb, int):
        raise CheckpointError(f"{where}: per-level layers_per_block {lpb} is not supported (needs one integer)")
    down = c["down_block_types"]
    attn = tuple(2 ** i for i, t in enumerate(down) if "CrossAttn" in t)
    up_attn = tuple(2 ** (len(down) - 1 - i) for i, t in enumerate(c["up_block_types"]) if "CrossAttn" in t)
    if sorted(attn) != sorted(up_attn):
        raise CheckpointError(f"{where}: down and up blocks place attention differently ({down} vs "
                              f"{c['up_block_types']}); the LDM UNet is symmetric")
    depth = c.get("transformer_layers_per_block", 1)
    if not isinstance(depth, int):
        if len(set(depth)) != 1:
            raise CheckpointError(f"{where}: per-level transformer depth {depth} is not supported")
        depth = depth[0]
    heads = c.get("num_attention_heads") or c.get("attention_head_dim", 8)  # diffusers' legacy name for heads
    num_heads, head_channels = 8, -1
    if isinstance(heads, int):
        num_heads = heads
    else:
        per = {ch // h for ch, h in zip(chans, heads)}
        if len(set(heads)) == 1:
            num_heads = heads[0]
        elif len(per) == 1:
            head_channels = per.pop()
        else:
            raise CheckpointError(f"{where}: attention heads {heads} fit neither a head count nor a head width")
    ctx = c.get("cross_attention_dim", 1280)
    if isinstance(ctx, (list, tuple)):
        if len(set(ctx)) != 1:
            raise CheckpointError(f"{where}: per-level cross_attention_dim {ctx} is not supported")
        ctx = ctx[0]
    return UNetConfig(
        in_channels=c.get("in_channels", 4), out_channels=c.get("out_channels", 4), model_channels=mc,
        channel_mult=tuple(ch // mc for ch in chans), num_res_blocks=lpb, attention_resolutions=attn,
        num_heads=num_heads, num_head_channels=head_channels, transformer_depth=depth, context_dim=ctx,
        use_linear_in_transformer=bool(c.get("use_linear_projection", False)),
        num_classes=c.get("num_class_embeds"), norm_groups=c.get("norm_num_groups", 32),
        time_cond_proj_dim=c.get("time_cond_proj_dim"),
        disable_self_attentions=tuple(c["only_cross_attention"]) if isinstance(c.get("only_cross_attention"), list)
        and any(c["only_cross_attention"]) else None,
    )


def vae_config(c: dict, where: str, kind: str) -> tuple[AutoencoderConfig, float]:
    for t in c.get("down_block_types", []) + c.get("up_block_types", []):
        if t not in ("DownEncoderBlock2D", "UpDecoderBlock2D"):
            raise CheckpointError(f"{where}: autoencoder block {t!r} is not supported")
    if c.get("norm_type", "group") != "group":
        raise CheckpointError(f"{where}: only group-norm autoencoders are supported")
    chans = list(c["block_out_channels"])
    z = c.get("latent_channels", 4)
    cfg = AutoencoderConfig(
        kind=kind, in_channels=c.get("in_channels", 3), out_ch=c.get("out_channels", 3), ch=chans[0],
        ch_mult=tuple(ch // chans[0] for ch in chans), num_res_blocks=c.get("layers_per_block", 1),
        z_channels=z, embed_dim=(c.get("vq_embed_dim") or z) if kind == "vq" else z,
        n_embed=c.get("num_vq_embeddings") if kind == "vq" else None, norm_groups=c.get("norm_num_groups", 32),
        resolution=c.get("sample_size", 256) if isinstance(c.get("sample_size", 256), int) else 256,
        attn_type="vanilla" if c.get("mid_block_add_attention", True) else "none",
    )
    return cfg, float(c.get("scaling_factor", 0.18215))


def text_encoder_config(c: dict, where: str, pad_token_id: int) -> TextEncoderConfig:
    if c.get("model_type", "clip_text_model") not in ("clip_text_model", "clip"):
        raise CheckpointError(f"{where}: text encoder type {c.get('model_type')!r} is not a CLIP text model")
    c = c.get("text_config", c)
    act = c.get("hidden_act", "quick_gelu")
    if act not in ("quick_gelu", "gelu"):
        raise CheckpointError(f"{where}: text encoder activation {act!r} is not supported")
    return TextEncoderConfig(
        vocab_size=c.get("vocab_size", 49408), max_length=c.get("max_position_embeddings", 77),
        width=c.get("hidden_size", 512), layers=c.get("num_hidden_layers", 12), heads=c.get("num_attention_heads", 8),
        intermediate_size=c.get("intermediate_size", 2048), act=act, output_layer=-1,
        layer_norm_eps=c.get("layer_norm_eps", 1e-5), pad_token_id=pad_token_id,
    )


_SCHEDULE_KEYS = ("beta_schedule", "beta_start", "beta_end", "num_train_timesteps", "timestep_spacing", "steps_offset",
                  "original_inference_steps", "timestep_scaling")
# diffusers' Stable Diffusion pipelines rewrite a loaded scheduler's steps_offset to 1 (a fix-up of old
# configs, with a deprecation warning): every scheduler made from pipe.scheduler.config sees that 1
_OFFSET_FIXUP_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline")


def schedule_config(c: dict, pipeline_class: str | None = None) -> tuple[ScheduleConfig, str]:
    """A scheduler_config.json -> (ScheduleConfig, prediction type). Keys the file omits, or lists in
    `_use_default_values`, are recorded as not explicit: each sampler then takes its own diffusers
    scheduler's default for them, as `NewScheduler.from_config(pipe.scheduler.config)` does.
    `pipeline_class`: the folder's model_index `_class_name` (Stable Diffusion pipelines set an explicit
    steps_offset to 1)."""
    pred = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}.get(c.get("prediction_type", "epsilon"))
    if pred is None:
        raise CheckpointError(f"unsupported scheduler prediction_type {c.get('prediction_type')!r}")
    defaulted = set(c.get("_use_default_values") or ())
    explicit = tuple(k for k in _SCHEDULE_KEYS if k in c and k not in defaulted)
    given = {k: c[k] for k in explicit}
    if pipeline_class in _OFFSET_FIXUP_PIPELINES and "steps_offset" in given:
        given["steps_offset"] = 1
    return ScheduleConfig(**{"steps_offset": 0, **given}, explicit=explicit), pred


def sampler_for_scheduler(c: dict) -> str | None:
    """The ldm_engine sampler that runs what a scheduler_config.json describes (diffusers' pipelines use
    the folder's scheduler unless told otherwise), or None when none does (that scheduler's algorithm
    or options are not implemented here)."""
    name = c.get("_class_name")
    if name == "DPMSolverMultistepScheduler":
        if c.get("algorithm_type", "dpmsolver++") != "dpmsolver++" or c.get("solver_order", 2) != 2:
            return None
        return "dpmpp_2m_karras" if c.get("use_karras_sigmas") else "dpmpp_2m"
    if name == "EulerDiscreteScheduler" and c.get("use_karras_sigmas"):
        return None
    if name == "PNDMScheduler" and not c.get("skip_prk_steps", False):
        return None  # the Runge-Kutta warm-up steps are not implemented; plms is the skip_prk_steps variant
    return {"DDIMScheduler": "ddim", "DDPMScheduler": "ddpm", "PNDMScheduler": "plms", "EulerDiscreteScheduler": "euler",
            "EulerAncestralDiscreteScheduler": "euler_a", "LCMScheduler": "lcm", "TCDScheduler": "tcd"}.get(name)
