"""CLIP text transformer (Radford et al. 2021) as used by Stable Diffusion: ViT-L/14's text tower
(SD1) and OpenCLIP ViT-H/14's (SD2). Attribute names follow transformers' CLIPTextModel
(`embeddings.token_embedding`, `encoder.layers.N.self_attn.q_proj`, `final_layer_norm`), which is
also the layout of SD1 checkpoints; OpenCLIP keys are mapped onto it by the loader."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .configs import TextEncoderConfig


class Embeddings(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.position_embedding = nn.Embedding(cfg.max_length, cfg.width)

    def forward(self, ids):
        return self.token_embedding(ids) + self.position_embedding.weight[: ids.shape[1]]


class SelfAttention(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.heads = cfg.heads
        self.q_proj = nn.Linear(cfg.width, cfg.width)
        self.k_proj = nn.Linear(cfg.width, cfg.width)
        self.v_proj = nn.Linear(cfg.width, cfg.width)
        self.out_proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = (p(x).reshape(b, n, self.heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # causal, as CLIP's text tower
        return self.out_proj(out.transpose(1, 2).reshape(b, n, c))


class MLP(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.width, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.width)
        self.quick_gelu = cfg.act == "quick_gelu"

    def forward(self, x):
        x = self.fc1(x)
        x = x * torch.sigmoid(1.702 * x) if self.quick_gelu else F.gelu(x)
        return self.fc2(x)


class EncoderLayer(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.self_attn = SelfAttention(cfg)
        self.layer_norm1 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.layers))


def checked_call(config, ids: torch.Tensor, output_layer: int | None, layers: int) -> int:
    """A text encoder's call checked: ids (B, L <= max_length); the output layer (negative, None: the
    config's) within its `layers` layers. Returns that layer."""
    if ids.ndim != 2 or ids.shape[1] > config.max_length:
        raise ValueError(f"token ids must be (B, L<={config.max_length}), got shape {tuple(ids.shape)}")
    output_layer = config.output_layer if output_layer is None else output_layer
    if not -layers <= output_layer <= -1:
        raise ValueError(f"output_layer must be in [-{layers}, -1], got {output_layer}")
    return output_layer


class CLIPTextEncoder(nn.Module):
    """ids (B, L) -> context (B, L, width): the chosen layer's output after the final LayerNorm."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = Embeddings(cfg)
        self.encoder = Encoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)

    def forward(self, ids: torch.Tensor, output_layer: int | None = None) -> torch.Tensor:
        """`output_layer` (negative, None: the config's): whose output feeds the final LayerNorm."""
        n = len(self.encoder.layers)
        output_layer = checked_call(self.config, ids, output_layer, n)
        x = self.embeddings(ids)
        # output_layer -1 runs every layer; -2 (SD2) stops one before the last.
        for layer in self.encoder.layers[: n + 1 + output_layer]:
            x = layer(x)
        return self.final_layer_norm(x)


class ClassEmbedder(nn.Module):
    """Class label (B,) -> context (B, 1, dim) for class-conditional LDMs (cross-attention on the class)."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.embedding = nn.Embedding(num_classes, dim)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.embedding(labels.long())[:, None, :]
