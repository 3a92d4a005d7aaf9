"""The time-conditional UNet of the LDM paper (Sec. 3.3), in the layout of the original
`openaimodel.UNetModel`: `input_blocks`, `middle_block`, `output_blocks`, so original checkpoint keys
(`model.diffusion_model.*`) load unchanged."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .attention import AttentionBlock, SpatialTransformer
from .autoencoder_blocks import Upsample  # nearest x2 then a 3x3 conv, the same in both networks
from .configs import UNetConfig


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding (B,) -> (B, dim), cos half first then sin, as Stable Diffusion."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


def guidance_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding (B,) -> (B, dim) of the guidance weight w = guidance_scale - 1 that an
    LCM-distilled UNet takes beside its timestep (Luo et al. 2023; the VDM-style embedding of
    diffusers' LatentConsistencyModelPipeline): 1000 w times frequencies 10000^(-i / (dim/2 - 1)),
    sin half first then cos, in float32."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -(torch.log(torch.tensor(10000.0)) / (half - 1)))
    args = (w.float() * 1000.0)[:, None] * freqs[None]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class ResBlock(nn.Module):
    """Residual block with the time embedding added between its convs (or, with `scale_shift`, applied
    as a FiLM scale and shift on the second norm). `resample` = "up"/"down" resizes inside the block
    (the original `resblock_updown` option)."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int, groups: int = 32,
                 scale_shift: bool = False, resample: str | None = None):
        super().__init__()
        self.scale_shift, self.resample = scale_shift, resample
        self.in_layers = nn.Sequential(nn.GroupNorm(groups, channels), nn.SiLU(),
                                       nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels * (2 if scale_shift else 1)))
        self.out_layers = nn.Sequential(nn.GroupNorm(groups, out_channels), nn.SiLU(), nn.Dropout(0.0),
                                        nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip_connection = nn.Identity() if channels == out_channels else nn.Conv2d(channels, out_channels, 1)

    def _resize(self, x):
        if self.resample == "up":
            return F.interpolate(x, scale_factor=2.0, mode="nearest")
        return F.avg_pool2d(x, kernel_size=2, stride=2) if self.resample == "down" else x

    def forward(self, x, emb):
        if self.resample:
            h = self.in_layers[2](self._resize(self.in_layers[1](self.in_layers[0](x))))
            x = self._resize(x)
        else:
            h = self.in_layers(x)
        e = self.emb_layers(emb)[:, :, None, None]
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[3](self.out_layers[2](self.out_layers[1](h)))
        else:
            h = self.out_layers(h + e)
        return self.skip_connection(x) + h


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class TimestepSequential(nn.Sequential):
    """Passes the time embedding to ResBlocks and the context to attention layers."""

    def forward(self, x, emb, context=None):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, (SpatialTransformer, AttentionBlock)):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


def make_resblock(cfg: UNetConfig, cin: int, cout: int, resample: str | None = None) -> ResBlock:
    return ResBlock(cin, cfg.time_embed_dim, cout, cfg.norm_groups, cfg.use_scale_shift_norm, resample)


def make_attention(cfg: UNetConfig, ch: int, level: int | None) -> nn.Module:
    """The attention layer of a block on `ch` channels at `level` (None: the middle block)."""
    heads, dim_head = cfg.heads_for(ch)
    if cfg.use_spatial_transformer:
        no_self = level is not None and bool(cfg.disable_self_attentions and cfg.disable_self_attentions[level])
        return SpatialTransformer(ch, heads, dim_head, cfg.transformer_depth, cfg.context_dim,
                                  cfg.use_linear_in_transformer, cfg.norm_groups, no_self)
    return AttentionBlock(ch, heads, cfg.norm_groups)


def build_encoder(cfg: UNetConfig) -> tuple[nn.ModuleList, TimestepSequential, list[int]]:
    """The UNet's encoder half, shared with ControlNet: (input_blocks, middle_block, channels of each
    skip connection, one per input block)."""
    mc = cfg.model_channels
    input_blocks = nn.ModuleList([TimestepSequential(nn.Conv2d(cfg.in_channels, mc, 3, padding=1))])
    skip_chans, ch, ds = [mc], mc, 1
    for level, mult in enumerate(cfg.channel_mult):
        for _ in range(cfg.num_res_blocks):
            layers = [make_resblock(cfg, ch, mult * mc)]
            ch = mult * mc
            if ds in cfg.attention_resolutions:
                layers.append(make_attention(cfg, ch, level))
            input_blocks.append(TimestepSequential(*layers))
            skip_chans.append(ch)
        if level != len(cfg.channel_mult) - 1:
            input_blocks.append(TimestepSequential(make_resblock(cfg, ch, ch, "down") if cfg.resblock_updown
                                                   else Downsample(ch)))
            skip_chans.append(ch)
            ds *= 2
    middle_block = TimestepSequential(make_resblock(cfg, ch, ch), make_attention(cfg, ch, None), make_resblock(cfg, ch, ch))
    return input_blocks, middle_block, skip_chans


def add_time_embeddings(net: nn.Module, cfg: UNetConfig) -> None:
    """time_embed (+ time_embed_cond for LCM-distilled nets, label_emb for class-conditional ones)."""
    mc, ted = cfg.model_channels, cfg.time_embed_dim
    net.time_embed = nn.Sequential(nn.Linear(mc, ted), nn.SiLU(), nn.Linear(ted, ted))
    if cfg.time_cond_proj_dim is not None:  # LCM-distilled: the guidance embedding joins the timestep's
        net.time_embed_cond = nn.Linear(cfg.time_cond_proj_dim, mc, bias=False)
    if cfg.num_classes is not None:
        net.label_emb = nn.Embedding(cfg.num_classes, ted)


def embed_time(net: nn.Module, x: torch.Tensor, t, class_labels=None, timestep_cond=None) -> torch.Tensor:
    """(B, time_embed_dim) embedding of timestep t (scalar or (B,)), plus the LCM guidance embedding and
    the class embedding where `net` (a UNet or ControlNet made with add_time_embeddings) has them."""
    cfg = net.config
    t = torch.as_tensor(t, device=x.device)
    t = t.expand(x.shape[0]) if t.ndim == 0 else t
    t_emb = timestep_embedding(t, cfg.model_channels).to(x.dtype)
    if timestep_cond is not None:
        if cfg.time_cond_proj_dim is None:
            raise ValueError("timestep_cond is for LCM-distilled UNets (time_cond_proj_dim set); this UNet has none")
        t_emb = t_emb + net.time_embed_cond(timestep_cond.to(x.dtype))
    emb = net.time_embed(t_emb)
    if cfg.num_classes is not None:
        if class_labels is None:
            raise ValueError("this UNet is class-conditional: pass class_labels (B,) as integers")
        emb = emb + net.label_emb(torch.as_tensor(class_labels, device=x.device).long().expand(x.shape[0]))
    return emb


class UNetModel(nn.Module):
    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.config = cfg
        mc, g = cfg.model_channels, cfg.norm_groups

        def res(cin: int, cout: int, resample: str | None = None) -> ResBlock:
            return make_resblock(cfg, cin, cout, resample)

        add_time_embeddings(self, cfg)
        self.input_blocks, self.middle_block, skip_chans = build_encoder(cfg)
        ch, ds = skip_chans[-1], 2 ** (len(cfg.channel_mult) - 1)

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [res(ch + skip_chans.pop(), mc * mult)]
                ch = mc * mult
                if ds in cfg.attention_resolutions:
                    layers.append(make_attention(cfg, ch, level))
                if level and i == cfg.num_res_blocks:
                    layers.append(res(ch, ch, "up") if cfg.resblock_updown else Upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepSequential(*layers))

        self.out = nn.Sequential(nn.GroupNorm(g, ch), nn.SiLU(), nn.Conv2d(mc, cfg.out_channels, 3, padding=1))

    @property
    def downsampling_factor(self) -> int:
        return 2 ** (len(self.config.channel_mult) - 1)

    def forward(self, x: torch.Tensor, t, context: torch.Tensor | None = None,
                class_labels: torch.Tensor | None = None, timestep_cond: torch.Tensor | None = None,
                control: list[torch.Tensor] | None = None) -> torch.Tensor:
        """x (B, C_in, h, w), t scalar or (B,), context (B, L, context_dim) -> model output (B, C_out, h, w).
        timestep_cond (B, time_cond_proj_dim): an LCM-distilled UNet's guidance embedding (guidance_embedding),
        projected and added to the sinusoidal timestep embedding; without it the UNet runs unconditioned on w.
        control: ControlNet residuals, one per input block (added to the skips) and the middle one last
        (added after the middle block), as the ControlNet paper's ControlledUnetModel."""
        emb = embed_time(self, x, t, class_labels, timestep_cond)
        if self.config.context_dim is not None and self.config.use_spatial_transformer and context is None:
            raise ValueError("this UNet uses cross-attention: pass context (B, L, %d)" % self.config.context_dim)
        hs, h = [], x
        for block in self.input_blocks:
            h = block(h, emb, context)
            hs.append(h)
        h = self.middle_block(h, emb, context)
        if control is not None:
            if len(control) != len(hs) + 1:
                raise ValueError(f"control needs {len(hs) + 1} residuals (one per input block and the middle "
                                 f"one), got {len(control)}")
            hs = [s + c for s, c in zip(hs, control)]
            h = h + control[-1]
        for block in self.output_blocks:
            h = block(torch.cat([h, hs.pop()], dim=1), emb, context)
        return self.out(h)
