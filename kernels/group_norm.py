"""GroupNorm (+ SiLU) in one kernel per (sample, group): fp32 statistics in two passes over the group
(mean, then the centred variance), then normalization, affine and the optional SiLU in one pass.
NCHW and channels-last inputs both work: the group is walked through the tensor's own strides.

Reference: torch.nn.functional.group_norm followed by torch.nn.functional.silu (tests/test_kernels.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _group_norm(X, Y, W, B, HW, C, CPG, G, stride_n, stride_c, stride_p, eps,
                SILU: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    n, g = pid // G, pid % G
    count = CPG * HW
    base = n * stride_n + g * CPG * stride_c
    offs = tl.arange(0, BLOCK)
    # pass 1: mean
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, count, BLOCK):
        e = start + offs
        ok = e < count
        c, p = e // HW, e % HW
        acc += tl.load(X + base + c * stride_c + p * stride_p, mask=ok, other=0.0).to(tl.float32)
    mean = tl.sum(acc, 0) / count
    # pass 2: variance around the mean (no cancellation from E[x^2] - E[x]^2)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, count, BLOCK):
        e = start + offs
        ok = e < count
        c, p = e // HW, e % HW
        x = tl.load(X + base + c * stride_c + p * stride_p, mask=ok, other=0.0).to(tl.float32)
        d = tl.where(ok, x - mean, 0.0)
        acc += d * d
    rstd = 1.0 / tl.sqrt(tl.sum(acc, 0) / count + eps)
    # pass 3: normalize, affine, SiLU
    for start in range(0, count, BLOCK):
        e = start + offs
        ok = e < count
        c, p = e // HW, e % HW
        ch = g * CPG + c
        ptr = base + c * stride_c + p * stride_p
        x = tl.load(X + ptr, mask=ok, other=0.0).to(tl.float32)
        w = tl.load(W + ch, mask=ok, other=1.0).to(tl.float32)
        b = tl.load(B + ch, mask=ok, other=0.0).to(tl.float32)
        y = (x - mean) * rstd * w + b
        if SILU:
            y = y / (1.0 + tl.exp(-y))
        tl.store(Y + ptr, y.to(Y.dtype.element_ty), mask=ok)


def group_norm(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
               eps: float = 1e-5, silu: bool = False) -> torch.Tensor:
    """x (N, C, H, W) in NCHW or channels-last memory -> GroupNorm(x) (then SiLU), same layout."""
    if x.ndim not in (3, 4):
        raise ValueError(f"group_norm takes (N, C, L) or (N, C, H, W), got {tuple(x.shape)}")
    N, C = x.shape[:2]
    if C % num_groups:
        raise ValueError(f"{C} channels do not split into {num_groups} groups")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"group_norm supports float32/float16/bfloat16, got {x.dtype}")
    spatial = x.shape[2:]
    HW = 1
    for s in spatial:
        HW *= s
    # the spatial positions must be one strided run: true for NCHW-contiguous and channels-last
    strides = x.stride()
    if x.ndim == 4 and strides[2] != strides[3] * x.shape[3]:
        x = x.contiguous()
        strides = x.stride()
    stride_p = strides[-1]
    weight = torch.ones(C, device=x.device, dtype=x.dtype) if weight is None else weight
    bias = torch.zeros(C, device=x.device, dtype=x.dtype) if bias is None else bias
    y = torch.empty_like(x)  # keeps x's memory format
    if y.stride() != strides:
        raise ValueError("group_norm: output layout differs from the input's")
    block = min(1024, triton.next_power_of_2(max(16, (C // num_groups) * HW)))
    _group_norm[(N * num_groups,)](x, y, weight, bias, HW, C, C // num_groups, num_groups, strides[0], strides[1],
                                   stride_p, float(eps), SILU=bool(silu), BLOCK=block)
    return y
