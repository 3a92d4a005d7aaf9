"""Fused flash attention forward (Dao et al. 2022, "FlashAttention"): softmax(q k^T * scale) v without
materializing the attention matrix. Online softmax with fp32 statistics and accumulator; the scale is
applied to q inside the q k^T product (SD 2.x overflows fp16 otherwise). Serves self-attention
(Nq = Nk = h*w) and cross-attention (Nk = 77: a tile's whole K/V fits on chip).

Reference: torch.nn.functional.scaled_dot_product_attention (see tests/test_kernels.py).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

MAX_HEAD_DIM = 256


@triton.jit
def _attention_fwd(Q, K, V, O, scale, Nq, Nk, D,
                   sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, som, sod, H,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    m_ok = offs_m < Nq
    d_ok = offs_d < D
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    q = (q.to(tl.float32) * scale).to(q.dtype)  # scale inside the product, before q k^T can overflow
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running row max
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running softmax denominator
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start in range(0, Nk, BLOCK_N):
        n = start + offs_n
        n_ok = n < Nk
        k = tl.load(K + b * skb + h * skh + n[:, None] * skn + offs_d[None, :] * skd,
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        if IEEE:  # fp32 inputs: full-precision products (no TF32 on the tensor cores)
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = s.to(tl.float32)  # (BLOCK_M, BLOCK_N)
        s = tl.where(n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + b * svb + h * svh + n[:, None] * svn + offs_d[None, :] * svd,
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        if IEEE:
            pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv.to(tl.float32)
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(O + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :] * sod, out.to(O.dtype.element_ty),
             mask=m_ok[:, None] & d_ok[None, :])


def _block_sizes(nq: int, nk: int, d_pad: int) -> tuple[int, int]:
    """Tiles sized so q, k, v and the accumulator stay in registers / shared memory."""
    block_m = 64 if d_pad <= 128 else 32
    block_n = 64 if d_pad <= 64 else 32
    # short sequences (cross-attention on 77 tokens, tests): smaller tiles waste less
    block_m = min(block_m, max(16, triton.next_power_of_2(nq)))
    block_n = min(block_n, max(16, triton.next_power_of_2(nk)))
    return block_m, block_n


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """q (B, H, Nq, D), k and v (B, H, Nk, D) -> (B, H, Nq, D); scale defaults to 1/sqrt(D)."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"flash_attention takes (B, H, N, D) tensors, got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    B, H, Nq, D = q.shape
    if k.shape[:2] != (B, H) or v.shape[:2] != (B, H) or k.shape[-1] != D or v.shape[-1] != D or k.shape[2] != v.shape[2]:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)} and v {tuple(v.shape)} must share batch, heads "
                         f"and head dim, and k and v their length")
    if D > MAX_HEAD_DIM:
        raise ValueError(f"head dim {D} exceeds the supported {MAX_HEAD_DIM}")
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one of float32/float16/bfloat16, got {q.dtype}, {k.dtype}, {v.dtype}")
    Nk = k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    out = torch.empty_like(q)
    d_pad = max(16, triton.next_power_of_2(D))
    block_m, block_n = _block_sizes(Nq, Nk, d_pad)
    grid = (triton.cdiv(Nq, block_m), B * H)
    _attention_fwd[grid](q, k, v, out, scale, Nq, Nk, D, *q.stride(), *k.stride(), *v.stride(), *out.stride(), H,
                         BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=d_pad, IEEE=q.dtype == torch.float32)
    return out
