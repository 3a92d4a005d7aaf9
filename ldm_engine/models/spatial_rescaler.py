"""The conditioning stage of the LDM paper's semantic synthesis models (Rombach et al. 2022, Sec. 4.3.2):
`SpatialRescaler` of the original `ldm/modules/encoders/modules.py`. A one-hot label map (B, classes, H, W)
is resized `n_stages` times by `multiplier` (bilinear x0.5 twice: to the VQ-f4 latent's size), then mapped
by a bias-free 1x1 conv to a few channels that are concatenated to the latent. The attribute name
`channel_mapper` is the checkpoint's (`cond_stage_model.channel_mapper.weight`)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .configs import SpatialRescalerConfig


class SpatialRescaler(nn.Module):
    def __init__(self, cfg: SpatialRescalerConfig):
        super().__init__()
        self.config = cfg
        self.channel_mapper = nn.Conv2d(cfg.in_channels, cfg.out_channels, 1, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_channels, H, W) -> (B, out_channels, H * m^n, W * m^n)."""
        if x.ndim != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(f"SpatialRescaler takes (B, {self.config.in_channels}, H, W), got {tuple(x.shape)}")
        for _ in range(self.config.n_stages):
            # scale_factor (not a size), no antialiasing, align_corners False: the original call
            x = F.interpolate(x, scale_factor=self.config.multiplier, mode=self.config.method)
        return self.channel_mapper(x)

    def encode_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """forward() of the one-hot map of class ids (H, W) -> (1, out_channels, h, w), without making the
        (classes, H, W) one-hot tensor: the 1x1 conv of a one-hot pixel is the weight column of its class,
        and the conv commutes with the resizing (both are linear; interpolation weights sum to 1, so a bias
        passes through unchanged)."""
        w = self.channel_mapper.weight[:, :, 0, 0]  # (out, classes)
        x = w.t()[ids.long()].permute(2, 0, 1)[None]  # (1, out, H, W)
        if self.channel_mapper.bias is not None:
            x = x + self.channel_mapper.bias[None, :, None, None]
        for _ in range(self.config.n_stages):
            x = F.interpolate(x, scale_factor=self.config.multiplier, mode=self.config.method)
        return x
