"""Config dataclasses for every model family, and presets looked up by name.

Field names follow the original LDM / Stable Diffusion YAML configs (`unet_config.params`,
`ddconfig`, ...) so that an original config maps onto them one to one.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field, fields, replace


@dataclass
class UNetConfig:
    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    # Downsampling factors (not resolutions) at which attention is used, as in the original configs.
    attention_resolutions: tuple[int, ...] = (4, 2, 1)
    num_heads: int = 8
    num_head_channels: int = -1  # > 0: heads = channels // num_head_channels (SD2 style)
    transformer_depth: int = 1
    context_dim: int | None = 768  # None: no cross-attention (unconditional / class-only models)
    use_spatial_transformer: bool = True  # False: the ADM-style AttentionBlock of unconditional LDMs
    use_linear_in_transformer: bool = False  # SD2: linear proj_in/proj_out instead of 1x1 convs
    num_classes: int | None = None  # class / noise-level embedding added to the time embedding
    norm_groups: int = 32
    # Per level: the first attention of each transformer block attends to the context instead of
    # itself (the x4 upscaler's first levels).
    disable_self_attentions: tuple[bool, ...] | None = None
    use_scale_shift_norm: bool = False  # time embedding as FiLM scale/shift (original LDM UNets)
    resblock_updown: bool = False  # resample inside ResBlocks instead of separate (de)convs
    # LCM-distilled UNets: width of the guidance-scale embedding projected onto the timestep embedding
    # (diffusers' time_cond_proj_dim); None for ordinary UNets
    time_cond_proj_dim: int | None = None

    def __post_init__(self):
        self.channel_mult = tuple(self.channel_mult)
        self.attention_resolutions = tuple(sorted(self.attention_resolutions))
        if self.disable_self_attentions is not None:
            self.disable_self_attentions = tuple(self.disable_self_attentions)
            if len(self.disable_self_attentions) != len(self.channel_mult):
                raise ValueError(f"disable_self_attentions needs one entry per level ({len(self.channel_mult)}), "
                                 f"got {self.disable_self_attentions}")
            # only levels that have attention can disable it; normalized so equal models compare equal
            flags = tuple(bool(f) and 2 ** i in self.attention_resolutions
                          for i, f in enumerate(self.disable_self_attentions))
            self.disable_self_attentions = flags if any(flags) else None

    @property
    def time_embed_dim(self) -> int:
        return self.model_channels * 4

    def heads_for(self, channels: int) -> tuple[int, int]:
        """(num_heads, dim_head) of an attention layer on `channels` channels."""
        if self.num_head_channels > 0:
            return channels // self.num_head_channels, self.num_head_channels
        return self.num_heads, channels // self.num_heads


@dataclass
class AutoencoderConfig:
    kind: str = "kl"  # "kl" (diagonal Gaussian posterior) or "vq" (codebook)
    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 4
    embed_dim: int = 4
    attn_resolutions: tuple[int, ...] = ()  # encoder/decoder resolutions with an attention block
    resolution: int = 256  # training resolution; only used to place attn_resolutions
    n_embed: int | None = None  # codebook size of a VQ autoencoder
    norm_groups: int = 32
    # "vanilla": single-head attention in the middle blocks (and at attn_resolutions); "none": no attention
    # anywhere (the original `attn_type: none`, e.g. the VQ-f4 of the big LDM inpainting model)
    attn_type: str = "vanilla"

    def __post_init__(self):
        self.ch_mult = tuple(self.ch_mult)
        self.attn_resolutions = tuple(self.attn_resolutions)
        if self.kind not in ("kl", "vq"):
            raise ValueError(f"autoencoder kind must be 'kl' or 'vq', got {self.kind!r}")
        if self.attn_type not in ("vanilla", "none"):
            raise ValueError(f"autoencoder attn_type must be 'vanilla' or 'none', got {self.attn_type!r}")
        if self.kind == "vq" and not self.n_embed:
            raise ValueError("a VQ autoencoder needs n_embed (the codebook size)")

    @property
    def downsampling_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


@dataclass
class TextEncoderConfig:
    """CLIP text transformer: ViT-L/14 (SD1) or OpenCLIP ViT-H/14 (SD2)."""
    vocab_size: int = 49408
    max_length: int = 77
    width: int = 768
    layers: int = 12
    heads: int = 12
    intermediate_size: int = 3072
    act: str = "quick_gelu"  # "quick_gelu" (OpenAI CLIP) or "gelu" (OpenCLIP)
    # Which layer's output feeds the final LayerNorm: -1 = last (SD1), -2 = penultimate (SD2).
    output_layer: int = -1
    layer_norm_eps: float = 1e-5
    pad_token_id: int = 49407  # SD1 pads with the end token, SD2 (OpenCLIP) with 0
    bos_token_id: int = 49406
    eos_token_id: int = 49407

    def __post_init__(self):
        if self.act not in ("quick_gelu", "gelu"):
            raise ValueError(f"text encoder act must be 'quick_gelu' or 'gelu', got {self.act!r}")
        if not -self.layers <= self.output_layer <= -1:
            raise ValueError(f"output_layer must be in [-{self.layers}, -1], got {self.output_layer}")


@dataclass
class BERTConfig:
    """The original LDM `BERTEmbedder` transformer (ldm_engine.models.bert): `n_embed` = width, `n_layer` =
    layers, 8 heads x 64 whatever the width, feed-forward 4 x width. `tokenizer` False: its ids are not
    word pieces but given directly (the layout model's bounding-box tokens)."""
    kind: str = "bert"  # tells a BERT config from a CLIP TextEncoderConfig in to_dict / from_dict
    vocab_size: int = 30522  # bert-base-uncased's WordPiece vocabulary
    max_length: int = 77
    width: int = 1280
    layers: int = 32
    heads: int = 8
    head_dim: int = 64
    intermediate_size: int | None = None  # None: 4 x width
    layer_norm_eps: float = 1e-5
    output_layer: int = -1
    tokenizer: bool = True

    def __post_init__(self):
        if self.kind != "bert":
            raise ValueError(f"BERTConfig kind must be 'bert', got {self.kind!r}")
        self.intermediate_size = self.intermediate_size or 4 * self.width
        if not -self.layers <= self.output_layer <= -1:
            raise ValueError(f"output_layer must be in [-{self.layers}, -1], got {self.output_layer}")


@dataclass
class ScheduleConfig:
    """The training noise schedule (the original configs' linear_start/linear_end/timesteps)."""
    beta_schedule: str = "scaled_linear"  # the original code calls this "linear"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    num_train_timesteps: int = 1000
    timestep_spacing: str = "leading"
    steps_offset: int = 1
    # LCM / TCD: length of the distillation schedule the few-step timesteps are taken from, and the
    # timestep scaling of the consistency boundary condition
    original_inference_steps: int = 50
    timestep_scaling: float = 10.0
    # The fields a diffusers scheduler config sets explicitly; the others take each sampler's own
    # default (sampling/samplers.py SPACING_DEFAULTS), as diffusers' `from_config` scheduler swap does.
    # None: every field is fixed (presets, single-file checkpoints, original YAML configs).
    explicit: tuple[str, ...] | None = None

    def __post_init__(self):
        if self.explicit is not None:
            self.explicit = tuple(self.explicit)


@dataclass
class SpatialRescalerConfig:
    """The original `SpatialRescaler` conditioning stage (semantic synthesis): `n_stages` resizes by
    `multiplier` (`method` interpolation), then a 1x1 conv from `in_channels` (the label classes of a
    one-hot map) to `out_channels`, concatenated to the latent."""
    n_stages: int = 2
    method: str = "bilinear"
    multiplier: float = 0.5
    in_channels: int = 182
    out_channels: int = 3
    bias: bool = False

    def __post_init__(self):
        if self.method not in ("nearest", "linear", "bilinear", "trilinear", "bicubic", "area"):
            raise ValueError(f"SpatialRescaler method {self.method!r} is not an interpolation mode")
        if self.n_stages < 0:
            raise ValueError(f"SpatialRescaler n_stages must be >= 0, got {self.n_stages}")


@dataclass
class LDMConfig:
    name: str
    unet: UNetConfig
    vae: AutoencoderConfig
    text_encoder: TextEncoderConfig | BERTConfig | None = None
    # "text": text-encoder context (CLIP, or the LDM BERT transformer); "class": a class embedder provides the
    # context; "layout": the BERT transformer over bounding-box tokens; "none": unconditional.
    conditioning: str = "text"
    num_classes: int | None = None  # for conditioning == "class"
    scale_factor: float = 0.18215
    prediction_type: str = "eps"  # "eps", "v" or "x0"
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    sample_size: int = 64  # default latent side (image side / downsampling factor)
    task: str = "txt2img"  # txt2img, inpaint, upscale, unconditional, class, depth, layout
    # x4 upscaler: the schedule that noises the low-res input, and the highest noise level it accepts
    noise_aug_schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(beta_start=0.0001, beta_end=0.02))
    max_noise_level: int = 350
    # the sampler a call without sampler= runs: a diffusers folder's own scheduler, else DDIM
    default_sampler: str = "ddim"
    # semantic synthesis: the conditioning stage over the one-hot label map (task "semantic")
    spatial_rescaler: SpatialRescalerConfig | None = None
    # the guidance scale of a call without guidance_scale=: 7.5 as diffusers' Stable Diffusion pipelines,
    # 1.0 (no classifier-free guidance) for the LDM BERT text-to-image models, as LDMTextToImagePipeline
    guidance_scale: float = 7.5

    def __post_init__(self):
        if self.conditioning not in ("text", "class", "layout", "none"):
            raise ValueError(f"conditioning must be 'text', 'class', 'layout' or 'none', got {self.conditioning!r}")
        if self.prediction_type not in ("eps", "v", "x0"):
            raise ValueError(f"prediction_type must be 'eps', 'v' or 'x0', got {self.prediction_type!r}")
        if self.conditioning in ("text", "layout") and self.text_encoder is None:
            raise ValueError(f"a {self.conditioning}-conditioned model needs a text_encoder config")
        if self.conditioning == "layout" and (not isinstance(self.text_encoder, BERTConfig)
                                              or self.text_encoder.tokenizer):
            raise ValueError("a layout-conditioned model needs a BERTConfig text encoder with tokenizer=False")

    @property
    def image_size(self) -> int:
        return self.sample_size * self.vae.downsampling_factor

    def replace(self, **changes) -> "LDMConfig":
        return replace(copy.deepcopy(self), **changes)


def to_dict(cfg) -> dict:
    """Nested plain dict of a config (for JSON side files)."""
    out = {}
    for f in fields(cfg):
        v = getattr(cfg, f.name)
        out[f.name] = to_dict(v) if hasattr(v, "__dataclass_fields__") else (list(v) if isinstance(v, tuple) else v)
    return out


def from_dict(d: dict) -> LDMConfig:
    d = dict(d)
    te = d.pop("text_encoder", None)
    if d.get("spatial_rescaler"):
        d["spatial_rescaler"] = SpatialRescalerConfig(**d["spatial_rescaler"])
    return LDMConfig(
        unet=UNetConfig(**d.pop("unet")),
        vae=AutoencoderConfig(**d.pop("vae")),
        text_encoder=(BERTConfig(**te) if te.get("kind") == "bert" else TextEncoderConfig(**te)) if te else None,
        schedule=ScheduleConfig(**d.pop("schedule", {})),
        noise_aug_schedule=ScheduleConfig(**d.pop("noise_aug_schedule", {})),
        **d,
    )


# ---- presets -------------------------------------------------------------------------------------

_SD_VAE = AutoencoderConfig(kind="kl", ch=128, ch_mult=(1, 2, 4, 4), z_channels=4, embed_dim=4)
_CLIP_L = TextEncoderConfig()
_OPENCLIP_H = TextEncoderConfig(width=1024, layers=24, heads=16, intermediate_size=4096, act="gelu",
                                output_layer=-2, pad_token_id=0)
_SD1_UNET = UNetConfig()
_SD2_UNET = UNetConfig(num_head_channels=64, context_dim=1024, use_linear_in_transformer=True)
_LDM_SCHEDULE = ScheduleConfig(beta_start=0.0015, beta_end=0.0195)
_VQ_F4 = AutoencoderConfig(kind="vq", ch=128, ch_mult=(1, 2, 4), z_channels=3, embed_dim=3, n_embed=8192)
_VQ_F8 = AutoencoderConfig(kind="vq", ch=128, ch_mult=(1, 2, 2, 4), z_channels=4, embed_dim=4, n_embed=16384,
                           attn_resolutions=(32,))
_LDM_SCHEDULE_L1 = ScheduleConfig(beta_start=0.0015, beta_end=0.0205)  # semantic synthesis, inpainting_big
_TINY_VQ_F4 = AutoencoderConfig(kind="vq", ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=3, embed_dim=3,
                                n_embed=64, norm_groups=8)
# 32 groups, as the real models: group counts leave no trace in weights, so detection assumes 32
_TINY_VQ_F4_G32 = AutoencoderConfig(kind="vq", ch=32, ch_mult=(1, 1, 2), num_res_blocks=1, z_channels=3, embed_dim=3,
                                    n_embed=64)
_KL_F8 = AutoencoderConfig(kind="kl", ch=128, ch_mult=(1, 2, 4, 4), z_channels=4, embed_dim=4)

PRESETS: dict[str, LDMConfig] = {
    "sd-1.5": LDMConfig("sd-1.5", _SD1_UNET, _SD_VAE, _CLIP_L),
    "sd-1.5-inpaint": LDMConfig("sd-1.5-inpaint", replace(_SD1_UNET, in_channels=9), _SD_VAE, _CLIP_L,
                                task="inpaint"),
    "sd-2.1-base": LDMConfig("sd-2.1-base", _SD2_UNET, _SD_VAE, _OPENCLIP_H),
    "sd-2.1-v": LDMConfig("sd-2.1-v", _SD2_UNET, _SD_VAE, _OPENCLIP_H, prediction_type="v", sample_size=96),
    "sd-2-inpaint": LDMConfig("sd-2-inpaint", replace(_SD2_UNET, in_channels=9), _SD_VAE, _OPENCLIP_H,
                              task="inpaint"),
    # depth-to-image (512-depth-ema): 4 latent + 1 depth channel, eps-prediction at 512 px
    "sd-2-depth": LDMConfig("sd-2-depth", replace(_SD2_UNET, in_channels=5), _SD_VAE, _OPENCLIP_H, task="depth"),
    # x4 upscaler: 4 latent + 3 low-res image channels, noise level as the class input, f4 VAE.
    "sd-x4-upscaler": LDMConfig(
        "sd-x4-upscaler",
        UNetConfig(in_channels=7, model_channels=256, channel_mult=(1, 2, 2, 4), attention_resolutions=(2, 4, 8),
                   num_head_channels=64, context_dim=1024, use_linear_in_transformer=True, num_classes=1000,
                   disable_self_attentions=(True, True, True, False)),
        AutoencoderConfig(kind="kl", ch=128, ch_mult=(1, 2, 4), z_channels=4, embed_dim=4),
        _OPENCLIP_H, scale_factor=0.08333, prediction_type="v", sample_size=128, task="upscale",
        schedule=ScheduleConfig(beta_start=0.0001, beta_end=0.02),
    ),
    # Original LDM families (CompVis configs): unconditional and class-conditional.
    "ldm-vq-f4": LDMConfig(
        "ldm-vq-f4",
        UNetConfig(in_channels=3, out_channels=3, model_channels=224, channel_mult=(1, 2, 3, 4),
                   attention_resolutions=(8, 4, 2), num_head_channels=32, context_dim=None,
                   use_spatial_transformer=False),
        _VQ_F4, conditioning="none", scale_factor=1.0, schedule=_LDM_SCHEDULE, task="unconditional",
    ),
    "ldm-kl-f8": LDMConfig(  # the LSUN-churches model of the paper
        "ldm-kl-f8",
        UNetConfig(model_channels=192, channel_mult=(1, 2, 2, 4, 4), attention_resolutions=(1, 2, 4, 8),
                   num_heads=8, context_dim=None, use_spatial_transformer=False, use_scale_shift_norm=True,
                   resblock_updown=True),
        _KL_F8, conditioning="none", scale_factor=0.22765929, sample_size=32,
        schedule=ScheduleConfig(beta_start=0.0015, beta_end=0.0155), task="unconditional",
    ),
    "ldm-vq-f8-cin": LDMConfig(
        "ldm-vq-f8-cin",
        UNetConfig(model_channels=256, channel_mult=(1, 2, 4), attention_resolutions=(4, 2, 1),
                   num_head_channels=32, context_dim=512),
        _VQ_F8, conditioning="class", num_classes=1000, scale_factor=1.0, sample_size=32,
        schedule=_LDM_SCHEDULE, task="class",
    ),
    # The LDM paper's VQ-f4 models conditioned by concatenation (CompVis models/ldm/*/config.yaml).
    # bsr_sr: the low-resolution image in [-1, 1] (3 channels) joins the latent (3); output 4x its size
    "ldm-superres-4x": LDMConfig(
        "ldm-superres-4x",
        UNetConfig(in_channels=6, out_channels=3, model_channels=160, channel_mult=(1, 2, 2, 4),
                   attention_resolutions=(16, 8), num_head_channels=32, context_dim=None,
                   use_spatial_transformer=False),
        _VQ_F4, conditioning="none", scale_factor=1.0, schedule=ScheduleConfig(beta_start=0.0015, beta_end=0.0155),
        task="superres",
    ),
    # semantic_synthesis256 / 512: a one-hot label map (182 classes) through the SpatialRescaler joins the latent
    "ldm-semantic-256": LDMConfig(
        "ldm-semantic-256",
        UNetConfig(in_channels=6, out_channels=3, model_channels=128, channel_mult=(1, 4, 8),
                   attention_resolutions=(32, 16, 8), num_heads=8, context_dim=None, use_spatial_transformer=False),
        _VQ_F4, conditioning="none", scale_factor=1.0, schedule=_LDM_SCHEDULE_L1, task="semantic",
        spatial_rescaler=SpatialRescalerConfig(),
    ),
    "ldm-semantic-512": LDMConfig(
        "ldm-semantic-512",
        UNetConfig(in_channels=6, out_channels=3, model_channels=128, channel_mult=(1, 4, 8),
                   attention_resolutions=(32, 16, 8), num_heads=8, context_dim=None, use_spatial_transformer=False),
        _VQ_F4, conditioning="none", scale_factor=1.0, schedule=_LDM_SCHEDULE_L1, sample_size=128, task="semantic",
        spatial_rescaler=SpatialRescalerConfig(),
    ),
    # inpainting_big: [latent 3, masked-image latent 3, mask 1]; its VQ-f4 has no attention at all
    "ldm-inpaint-big": LDMConfig(
        "ldm-inpaint-big",
        UNetConfig(in_channels=7, out_channels=3, model_channels=256, channel_mult=(1, 2, 3, 4),
                   attention_resolutions=(8, 4, 2), num_heads=8, context_dim=None, use_spatial_transformer=False,
                   resblock_updown=True),
        replace(_VQ_F4, attn_type="none"), conditioning="none", scale_factor=1.0, schedule=_LDM_SCHEDULE_L1,
        task="inpaint",
    ),
    # The LDM paper's BERT-conditioned models (CompVis configs): text-to-image "txt2img-f8-large"
    # (LDM-KL-8-G, txt2img-1p4B-eval.yaml), the Conceptual Captions text2img256 model, and layout2img-openimages256.
    "ldm-txt2img-f8": LDMConfig(
        "ldm-txt2img-f8", replace(_SD1_UNET, context_dim=1280), _KL_F8, BERTConfig(width=1280, layers=32),
        sample_size=32, guidance_scale=1.0,
    ),
    "ldm-txt2img-f4-cc": LDMConfig(
        "ldm-txt2img-f4-cc",
        UNetConfig(in_channels=3, out_channels=3, model_channels=192, channel_mult=(1, 2, 3, 5),
                   attention_resolutions=(8, 4, 2), num_head_channels=32, context_dim=640),
        _VQ_F4, BERTConfig(width=640, layers=32), scale_factor=1.0, schedule=_LDM_SCHEDULE, guidance_scale=1.0,
    ),
    "ldm-layout2img": LDMConfig(
        "ldm-layout2img",
        UNetConfig(in_channels=3, out_channels=3, model_channels=128, channel_mult=(1, 2, 3, 4),
                   attention_resolutions=(8, 4, 2), num_head_channels=32, transformer_depth=3, context_dim=512),
        _VQ_F4, BERTConfig(vocab_size=8192, max_length=92, width=512, layers=16, tokenizer=False),
        conditioning="layout", scale_factor=1.0, schedule=_LDM_SCHEDULE_L1, task="layout", guidance_scale=1.0,
    ),
    # Tiny configs for tests: same code paths, seconds on a CPU.
    "tiny-sd1": LDMConfig(
        "tiny-sd1",
        UNetConfig(model_channels=32, channel_mult=(1, 2), attention_resolutions=(1, 2), num_heads=2,
                   context_dim=32, norm_groups=8),
        AutoencoderConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, norm_groups=8),
        TextEncoderConfig(width=32, layers=2, heads=2, intermediate_size=64),
        sample_size=8,
    ),
    "tiny-sd2-v": LDMConfig(
        "tiny-sd2-v",
        UNetConfig(model_channels=32, channel_mult=(1, 2), attention_resolutions=(1, 2), num_head_channels=8,
                   context_dim=32, use_linear_in_transformer=True, norm_groups=8),
        AutoencoderConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, norm_groups=8),
        TextEncoderConfig(width=32, layers=3, heads=2, intermediate_size=64, act="gelu", output_layer=-2,
                          pad_token_id=0),
        prediction_type="v", sample_size=8,
    ),
    "tiny-sd2-depth": LDMConfig(
        "tiny-sd2-depth",
        UNetConfig(in_channels=5, model_channels=32, channel_mult=(1, 2), attention_resolutions=(1, 2),
                   num_head_channels=8, context_dim=32, use_linear_in_transformer=True, norm_groups=8),
        AutoencoderConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, norm_groups=8),
        TextEncoderConfig(width=32, layers=3, heads=2, intermediate_size=64, act="gelu", output_layer=-2,
                          pad_token_id=0),
        sample_size=8, task="depth",
    ),
    "tiny-ldm-vq": LDMConfig(
        "tiny-ldm-vq",
        UNetConfig(in_channels=3, out_channels=3, model_channels=32, channel_mult=(1, 2),
                   attention_resolutions=(2,), num_head_channels=8, context_dim=None,
                   use_spatial_transformer=False, norm_groups=8),
        AutoencoderConfig(kind="vq", ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=3, embed_dim=3,
                          n_embed=64, norm_groups=8),
        conditioning="none", scale_factor=1.0, sample_size=8, schedule=_LDM_SCHEDULE, task="unconditional",
    ),
    "tiny-ldm-superres": LDMConfig(
        "tiny-ldm-superres",
        UNetConfig(in_channels=6, out_channels=3, model_channels=32, channel_mult=(1, 2), attention_resolutions=(2,),
                   num_head_channels=32, context_dim=None, use_spatial_transformer=False),
        _TINY_VQ_F4_G32, conditioning="none", scale_factor=1.0, sample_size=8,
        schedule=ScheduleConfig(beta_start=0.0015, beta_end=0.0155), task="superres",
    ),
    "tiny-ldm-semantic": LDMConfig(
        "tiny-ldm-semantic",
        UNetConfig(in_channels=6, out_channels=3, model_channels=32, channel_mult=(1, 2), attention_resolutions=(2,),
                   num_heads=8, context_dim=None, use_spatial_transformer=False),
        _TINY_VQ_F4_G32, conditioning="none", scale_factor=1.0, sample_size=8, schedule=_LDM_SCHEDULE_L1,
        task="semantic", spatial_rescaler=SpatialRescalerConfig(in_channels=6),
    ),
    "tiny-ldm-inpaint": LDMConfig(
        "tiny-ldm-inpaint",
        UNetConfig(in_channels=7, out_channels=3, model_channels=32, channel_mult=(1, 2), attention_resolutions=(2,),
                   num_heads=8, context_dim=None, use_spatial_transformer=False, resblock_updown=True),
        replace(_TINY_VQ_F4_G32, attn_type="none"), conditioning="none", scale_factor=1.0, sample_size=8,
        schedule=_LDM_SCHEDULE_L1, task="inpaint",
    ),
    # BERT-conditioned: 8 heads as the original (of width 4 here); bert-base-uncased's vocabulary size, so the
    # embedded tokenizer's ids fit
    "tiny-ldm-bert": LDMConfig(
        "tiny-ldm-bert",
        UNetConfig(model_channels=32, channel_mult=(1, 2), attention_resolutions=(1, 2), num_heads=2,
                   context_dim=32, norm_groups=8),
        AutoencoderConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, norm_groups=8),
        BERTConfig(width=32, layers=2, head_dim=4), sample_size=8, guidance_scale=1.0,
    ),
    # layout: 4 objects (14 tokens) on an 11 x 11 grid (vocabulary 128, padding token 127)
    "tiny-ldm-layout": LDMConfig(
        "tiny-ldm-layout",
        UNetConfig(in_channels=3, out_channels=3, model_channels=32, channel_mult=(1, 2), attention_resolutions=(1, 2),
                   num_head_channels=8, transformer_depth=2, context_dim=32, norm_groups=8),
        _TINY_VQ_F4, BERTConfig(vocab_size=128, max_length=14, width=32, layers=2, head_dim=4, tokenizer=False),
        conditioning="layout", scale_factor=1.0, sample_size=8, schedule=_LDM_SCHEDULE_L1, task="layout",
        guidance_scale=1.0,
    ),
}


def get_preset(name: str) -> LDMConfig:
    """A deep copy of the preset called `name`."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
    return copy.deepcopy(PRESETS[name])
