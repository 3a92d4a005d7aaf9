"""Encoder and decoder of the first-stage autoencoders (KL and VQ), as in the LDM paper (Sec. 3.1).

Attribute names follow the original checkpoints (`encoder.down.0.block.0.norm1`, `decoder.mid.attn_1.q`, ...)
so original state dicts load without renaming.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .configs import AutoencoderConfig


def Normalize(channels: int, groups: int = 32) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, groups: int = 32):
        super().__init__()
        self.norm1 = Normalize(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = Normalize(out_channels, groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels, with 1x1 conv projections."""

    def __init__(self, channels: int, groups: int = 32):
        super().__init__()
        self.norm = Normalize(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        b, c, h, w = x.shape
        hn = self.norm(x)
        # (B, C, H, W) -> (B, 1, HW, C): one head attending over every pixel.
        q, k, v = (p(hn).reshape(b, 1, c, h * w).transpose(2, 3) for p in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(2, 3).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Stride-2 conv with asymmetric (0, 1, 0, 1) padding, as the original autoencoders."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution level: `block` ResnetBlocks, optional `attn`, optional resampler."""

    def __init__(self):
        super().__init__()
        self.block = nn.ModuleList()
        self.attn = nn.ModuleList()


class MidBlock(nn.Module):
    def __init__(self, channels: int, groups: int, attention: bool = True):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups)
        # attn_type "none": an identity, as the original make_attn (no weights in the checkpoint)
        self.attn_1 = AttnBlock(channels, groups) if attention else nn.Identity()
        self.block_2 = ResnetBlock(channels, channels, groups)

    def forward(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    """Image (B, 3, H, W) -> moments (B, 2*z or z, H/f, W/f)."""

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        g = cfg.norm_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        res, ch = cfg.resolution, cfg.ch
        for i, mult in enumerate(cfg.ch_mult):
            level, out = Level(), cfg.ch * mult
            for _ in range(cfg.num_res_blocks):
                level.block.append(ResnetBlock(ch, out, g))
                ch = out
                if res in cfg.attn_resolutions and cfg.attn_type != "none":
                    level.attn.append(AttnBlock(ch, g))
            if i != len(cfg.ch_mult) - 1:
                level.downsample = Downsample(ch)
                res //= 2
            self.down.append(level)
        self.mid = MidBlock(ch, g, cfg.attn_type != "none")
        self.norm_out = Normalize(ch, g)
        z = 2 * cfg.z_channels if cfg.kind == "kl" else cfg.z_channels  # KL: mean and log-variance
        self.conv_out = nn.Conv2d(ch, z, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            for i, block in enumerate(level.block):
                h = block(h)
                if len(level.attn) > 0:
                    h = level.attn[i](h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent (B, z, h, w) -> image (B, 3, f*h, f*w). `up` is indexed from the lowest resolution's
    level number down, as in the original code (up[0] is the full-resolution level)."""

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        g = cfg.norm_groups
        ch = cfg.ch * cfg.ch_mult[-1]
        res = cfg.resolution // cfg.downsampling_factor
        self.conv_in = nn.Conv2d(cfg.z_channels, ch, 3, padding=1)
        self.mid = MidBlock(ch, g, cfg.attn_type != "none")
        levels = []
        for i in reversed(range(len(cfg.ch_mult))):
            level, out = Level(), cfg.ch * cfg.ch_mult[i]
            for _ in range(cfg.num_res_blocks + 1):
                level.block.append(ResnetBlock(ch, out, g))
                ch = out
                if res in cfg.attn_resolutions and cfg.attn_type != "none":
                    level.attn.append(AttnBlock(ch, g))
            if i != 0:
                level.upsample = Upsample(ch)
                res *= 2
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)
        self.norm_out = Normalize(ch, g)
        self.conv_out = nn.Conv2d(ch, cfg.out_ch, 3, padding=1)

    def forward(self, z):
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            for i, block in enumerate(level.block):
                h = block(h)
                if len(level.attn) > 0:
                    h = level.attn[i](h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


def _check_image(x: torch.Tensor, factor: int, what: str) -> None:
    if x.ndim != 4:
        raise ValueError(f"{what} must be a (B, C, H, W) tensor, got shape {tuple(x.shape)}")
    if x.shape[-1] % factor or x.shape[-2] % factor:
        raise ValueError(f"{what} height and width must be multiples of {factor}, got {tuple(x.shape[-2:])}")
