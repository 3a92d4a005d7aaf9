"""The LDM paper's BERT-style conditioning transformer τθ (Rombach et al. 2022, Sec. 3.3 and 4.3.1): the
original `BERTEmbedder`'s `TransformerWrapper` + `Encoder` (a trimmed copy of lucidrains' x-transformers),
trained from scratch on BERT word pieces (text-to-image) or on bounding-box tokens (layout-to-image).

    ids (B, L) ─token_emb─► + pos_emb.emb[:L] ─► N × [x + Attn(LN(x)), x + FF(LN(x))] ─► norm ─► (B, L, W)

- learned absolute positions, added to the token embedding;
- pre-norm blocks; attention with 8 heads × 64 regardless of the width (x-transformers' defaults), q/k/v
  without bias, no attention mask: padding tokens are attended to, as in the original;
- feed-forward Linear(width, 4·width) → exact GELU → Linear(4·width, width);
- a final LayerNorm; the original's `to_logits` head is never used for conditioning and is not built.

Attribute names are the original ones, so checkpoint keys under `cond_stage_model.transformer.` load as they
are: `token_emb`, `pos_emb.emb`, `attn_layers.layers.{2i}.{0: norm, 1: attention}`,
`attn_layers.layers.{2i+1}.{0: norm, 1: feed-forward net.0.0 / net.2}`, `norm`. diffusers' `LDMBertModel`
is mapped onto them by the loader (ldm_engine.loading.bert_keys).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .configs import BERTConfig
from .text_encoder import checked_call


class AbsolutePositions(nn.Module):
    """Learned position vectors (max_length, width); `emb` as the original names it."""

    def __init__(self, cfg: BERTConfig):
        super().__init__()
        self.emb = nn.Embedding(cfg.max_length, cfg.width)

    def forward(self, n: int) -> torch.Tensor:
        return self.emb.weight[:n]  # (n, width)


class Attention(nn.Module):
    """Multi-head self-attention over the whole sequence (no mask)."""

    def __init__(self, cfg: BERTConfig):
        super().__init__()
        self.heads, self.head_dim = cfg.heads, cfg.head_dim
        inner = cfg.heads * cfg.head_dim
        self.to_q = nn.Linear(cfg.width, inner, bias=False)
        self.to_k = nn.Linear(cfg.width, inner, bias=False)
        self.to_v = nn.Linear(cfg.width, inner, bias=False)
        self.to_out = nn.Linear(inner, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        # (B, heads, L, head_dim) each
        q, k, v = (p(x).reshape(b, n, self.heads, self.head_dim).transpose(1, 2)
                   for p in (self.to_q, self.to_k, self.to_v))
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q·kᵀ / sqrt(head_dim)) · v
        return self.to_out(out.transpose(1, 2).reshape(b, n, self.heads * self.head_dim))


class FeedForward(nn.Module):
    """Linear → exact GELU → Linear; `net.1` is the original's dropout slot (identity at inference)."""

    def __init__(self, cfg: BERTConfig):
        super().__init__()
        self.net = nn.Sequential(nn.Sequential(nn.Linear(cfg.width, cfg.intermediate_size), nn.GELU()), nn.Identity(),
                                 nn.Linear(cfg.intermediate_size, cfg.width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class PreNormResidual(nn.Sequential):
    """x + block(norm(x)): the original's [norm, block, residual] triple (its residual holds no weights)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + super().forward(x)


class AttentionLayers(nn.Module):
    def __init__(self, cfg: BERTConfig):
        super().__init__()
        blocks = []
        for _ in range(cfg.layers):  # one transformer layer = an attention entry then a feed-forward entry
            blocks.append(PreNormResidual(nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps), Attention(cfg)))
            blocks.append(PreNormResidual(nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps), FeedForward(cfg)))
        self.layers = nn.ModuleList(blocks)


class BERTEncoder(nn.Module):
    """ids (B, L<=max_length) -> (B, L, width): the chosen layer's output after the final LayerNorm.

    The same call shape as CLIPTextEncoder (`forward(ids, output_layer=None)`, `config.max_length`,
    `.vocab_size`, `.output_layer`, `.layers`, `.width`), so prompts, clip skip and the graph backends
    treat both alike."""

    def __init__(self, cfg: BERTConfig):
        super().__init__()
        self.config = cfg
        self.token_emb = nn.Embedding(cfg.vocab_size, cfg.width)
        self.pos_emb = AbsolutePositions(cfg)
        self.attn_layers = AttentionLayers(cfg)
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)

    def forward(self, ids: torch.Tensor, output_layer: int | None = None) -> torch.Tensor:
        """`output_layer` (negative, None: the config's): whose output feeds the final LayerNorm."""
        n = self.config.layers
        output_layer = checked_call(self.config, ids, output_layer, n)
        x = self.token_emb(ids) + self.pos_emb(ids.shape[1])
        for block in self.attn_layers.layers[: 2 * (n + 1 + output_layer)]:  # two entries per layer
            x = block(x)
        return self.norm(x)
