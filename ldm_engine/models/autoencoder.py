"""First-stage autoencoders of the LDM paper: KL-regularized (AutoencoderKL) and vector-quantized (VQModel).

Both map images in [-1, 1] to the autoencoder's own (unscaled) latent and back; the diffusion model
works on `latent * scale_factor`, which the pipeline applies.
"""
from __future__ import annotations

import torch
from torch import nn

from .autoencoder_blocks import Decoder, Encoder, _check_image
from .configs import AutoencoderConfig


class DiagonalGaussian:
    """Posterior q(z|x) = N(mean, exp(logvar)) of the KL autoencoder; moments (B, 2z, h, w)."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def mode(self) -> torch.Tensor:
        return self.mean

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(self.mean.shape, generator=generator, dtype=self.mean.dtype,
                            device=generator.device if generator is not None else self.mean.device)
        return self.mean + self.std * noise.to(self.mean.device)

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) summed over latent dims, per sample (used in training)."""
        return 0.5 * (self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar).sum(dim=(1, 2, 3))


class Deterministic:
    """The 'posterior' of a VQ autoencoder: the pre-quantization latent itself."""

    def __init__(self, latent: torch.Tensor):
        self.mean = latent

    def mode(self) -> torch.Tensor:
        return self.mean

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.mean


class AutoencoderKL(nn.Module):
    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)

    def encode(self, image: torch.Tensor) -> DiagonalGaussian:
        _check_image(image, self.config.downsampling_factor, "image")
        return DiagonalGaussian(self.quant_conv(self.encoder(image)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))


class VectorQuantizer(nn.Module):
    """Nearest-codebook-entry quantization (VQ-VAE, van den Oord et al. 2017)."""

    def __init__(self, n_embed: int, dim: int):
        super().__init__()
        self.embedding = nn.Embedding(n_embed, dim)

    def indices(self, z: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> (B, h, w) codebook indices."""
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        e = self.embedding.weight
        dist = flat.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1) - 2.0 * flat @ e.t()
        return dist.argmin(dim=1).reshape(z.shape[0], z.shape[2], z.shape[3])

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.embedding(self.indices(z)).permute(0, 3, 1, 2)


class VQModel(nn.Module):
    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.embed_dim, 1)
        self.quantize = VectorQuantizer(cfg.n_embed, cfg.embed_dim)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)

    def encode(self, image: torch.Tensor) -> Deterministic:
        _check_image(image, self.config.downsampling_factor, "image")
        return Deterministic(self.quant_conv(self.encoder(image)))

    def decode(self, z: torch.Tensor, force_not_quantize: bool = False) -> torch.Tensor:
        """Decode a latent; it is snapped to the codebook first unless `force_not_quantize`."""
        if not force_not_quantize:
            z = self.quantize(z)
        return self.decoder(self.post_quant_conv(z))


def build_autoencoder(cfg: AutoencoderConfig) -> nn.Module:
    return AutoencoderKL(cfg) if cfg.kind == "kl" else VQModel(cfg)
