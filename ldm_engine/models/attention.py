"""Attention layers of the LDM UNet: SpatialTransformer (self-attention -> cross-attention -> GEGLU
feed-forward, paper Sec. 3.3) and the ADM-style AttentionBlock of the unconditional LDMs."""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn


class CrossAttention(nn.Module):
    """Multi-head attention of x on `context` (on x itself when context is None)."""

    def __init__(self, query_dim: int, context_dim: int | None, heads: int, dim_head: int):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(0.0))

    def forward(self, x, context=None):
        context = x if context is None else context
        b, n, _ = x.shape
        # (B, N, H*D) -> (B, H, N, D)
        q, k, v = (t.reshape(b, t.shape[1], self.heads, -1).transpose(1, 2)
                   for t in (self.to_q(x), self.to_k(context), self.to_v(context)))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


class GEGLU(nn.Module):
    """GELU-gated linear unit (Shazeer 2020): one projection gives value and gate."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x):
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim))

    def forward(self, x):
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int | None, disable_self_attn: bool = False):
        super().__init__()
        self.disable_self_attn = disable_self_attn
        # self-attention, or a second cross-attention when self-attention is disabled
        self.attn1 = CrossAttention(dim, context_dim if disable_self_attn else None, heads, dim_head)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head)  # cross-attention on the context
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x, context=None):
        x = x + self.attn1(self.norm1(x), context if self.disable_self_attn else None)
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of a feature map (B, C, H, W), conditioned by cross-attention."""

    def __init__(self, channels: int, heads: int, dim_head: int, depth: int, context_dim: int | None,
                 use_linear: bool, groups: int = 32, disable_self_attn: bool = False):
        super().__init__()
        inner = heads * dim_head
        self.use_linear = use_linear
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, inner) if use_linear else nn.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, dim_head, context_dim, disable_self_attn) for _ in range(depth))
        self.proj_out = nn.Linear(inner, channels) if use_linear else nn.Conv2d(inner, channels, 1)

    def forward(self, x, context=None):
        b, c, h, w = x.shape
        hs = self.norm(x)
        if not self.use_linear:
            hs = self.proj_in(hs)
        hs = hs.flatten(2).transpose(1, 2)  # (B, HW, C)
        if self.use_linear:
            hs = self.proj_in(hs)
        for block in self.transformer_blocks:
            hs = block(hs, context)
        if self.use_linear:
            hs = self.proj_out(hs)
        hs = hs.transpose(1, 2).reshape(b, -1, h, w)
        if not self.use_linear:
            hs = self.proj_out(hs)
        return x + hs


class AttentionBlock(nn.Module):
    """Self-attention over pixels with a fused qkv 1x1 conv (the ADM block of unconditional LDMs).
    qkv channels are laid out per head as [q, k, v] (the original 'legacy' order)."""

    def __init__(self, channels: int, heads: int, groups: int = 32):
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(groups, channels, eps=1e-5)
        self.qkv = nn.Conv1d(channels, channels * 3, 1)
        self.proj_out = nn.Conv1d(channels, channels, 1)

    def forward(self, x, context=None):
        b, c, h, w = x.shape
        flat = x.reshape(b, c, h * w)
        qkv = self.qkv(self.norm(flat))  # (B, 3C, T)
        # (B, H*3*D, T) -> 3 x (B*H, T, D)
        q, k, v = qkv.reshape(b * self.heads, -1, h * w).transpose(1, 2).chunk(3, dim=-1)
        out = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(D), as the original's two D^-1/4
        out = out.transpose(1, 2).reshape(b, c, h * w)
        return (flat + self.proj_out(out)).reshape(b, c, h, w)
