"""ControlNet (Zhang, Rao & Agrawala 2023, "Adding Conditional Control to Text-to-Image Diffusion
Models"), in the layout of the original `cldm.ControlNet`: a trainable copy of the UNet's encoder
(`time_embed`, `input_blocks`, `middle_block`), a small hint encoder (`input_hint_block`) that brings the
control image down to the latent size, and zero-initialised convolutions (`zero_convs.N.0`,
`middle_block_out.0`) whose outputs are added to the UNet's skip connections and middle block."""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from ..models.configs import UNetConfig
from ..models.unet import add_time_embeddings, build_encoder, embed_time


@dataclass
class ControlNetConfig:
    unet: UNetConfig  # the encoder's architecture; in_channels are the latent channels (4), also for inpainting UNets
    hint_channels: tuple[int, ...] = (16, 32, 96, 256)  # hint encoder widths; each step after the first halves the size
    hint_in_channels: int = 3  # RGB control image
    global_pool: bool = False  # residuals mean-pooled over space (the "shuffle" ControlNet); implies guess mode

    def __post_init__(self):
        self.hint_channels = tuple(self.hint_channels)

    @classmethod
    def for_unet(cls, unet: UNetConfig, latent_channels: int = 4, **kw) -> "ControlNetConfig":
        """The ControlNet of a UNet: the same encoder, fed the plain latents."""
        return cls(replace(unet, in_channels=latent_channels, out_channels=latent_channels), **kw)

    @property
    def num_residuals(self) -> int:
        """One per input block plus the middle one (13 for SD)."""
        u = self.unet
        return 1 + len(u.channel_mult) * u.num_res_blocks + len(u.channel_mult) - 1 + 1


def _hint_encoder(cfg: ControlNetConfig) -> nn.Sequential:
    """3 -> 16 -> 16 -> 32/2 -> 32 -> 96/2 -> 96 -> 256/2 -> model channels (for the default widths):
    3x3 convs with SiLU between, stride 2 where the width grows; the last conv starts at zero."""
    ch = cfg.hint_channels
    layers = [nn.Conv2d(cfg.hint_in_channels, ch[0], 3, padding=1), nn.SiLU()]
    for cin, cout in zip(ch[:-1], ch[1:]):
        layers += [nn.Conv2d(cin, cin, 3, padding=1), nn.SiLU(), nn.Conv2d(cin, cout, 3, padding=1, stride=2), nn.SiLU()]
    layers.append(nn.Conv2d(ch[-1], cfg.unet.model_channels, 3, padding=1))
    nn.init.zeros_(layers[-1].weight)
    nn.init.zeros_(layers[-1].bias)
    return nn.Sequential(*layers)


def _zero_conv(channels: int) -> nn.Sequential:
    conv = nn.Conv2d(channels, channels, 1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return nn.Sequential(conv)


class ControlNet(nn.Module):
    def __init__(self, cfg: ControlNetConfig):
        super().__init__()
        self.control_config = cfg
        self.config = cfg.unet  # what embed_time reads
        add_time_embeddings(self, cfg.unet)
        self.input_hint_block = _hint_encoder(cfg)
        self.input_blocks, self.middle_block, skip_chans = build_encoder(cfg.unet)
        self.zero_convs = nn.ModuleList([_zero_conv(ch) for ch in skip_chans])
        self.middle_block_out = _zero_conv(skip_chans[-1])

    @property
    def hint_downsampling(self) -> int:
        """How much smaller the latents are than the control image (8 with the default widths)."""
        return 2 ** (len(self.control_config.hint_channels) - 1)

    def forward(self, x: torch.Tensor, hint: torch.Tensor, t, context: torch.Tensor | None = None,
                class_labels: torch.Tensor | None = None, timestep_cond: torch.Tensor | None = None,
                scale: float | torch.Tensor = 1.0) -> list[torch.Tensor]:
        """x (B, C, h, w) latents, hint (B, 3, h·f, w·f) control image in [0, 1], t scalar or (B,), context
        (B, L, context_dim) -> residuals: one per input block (B, C_i, h_i, w_i), then the middle block's.
        `scale`: a number, or one per residual (guess mode's ramp), applied to every residual."""
        emb = embed_time(self, x, t, class_labels, timestep_cond)
        guided = self.input_hint_block(hint.to(x.dtype))  # (B, model_channels, h, w)
        if guided.shape[-2:] != x.shape[-2:]:
            raise ValueError(f"control image {tuple(hint.shape[-2:])} encodes to {tuple(guided.shape[-2:])}, but the "
                             f"latents are {tuple(x.shape[-2:])}; give a control image {self.hint_downsampling}x the "
                             f"latent size")
        outs, h = [], x
        for i, (block, zero) in enumerate(zip(self.input_blocks, self.zero_convs)):
            h = block(h, emb, context)
            if i == 0:  # the encoded hint joins after the first conv
                h = h + guided
            outs.append(zero(h))
        outs.append(self.middle_block_out(self.middle_block(h, emb, context)))
        if self.control_config.global_pool:
            outs = [o.mean(dim=(2, 3), keepdim=True) for o in outs]
        scales = scale if isinstance(scale, (list, tuple)) or (torch.is_tensor(scale) and scale.ndim) else [scale] * len(outs)
        return [o * s for o, s in zip(outs, scales)]
