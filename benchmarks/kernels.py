"""Triton kernels against their torch counterparts at the SD-1.5 512x512 shapes.

    python benchmarks/kernels.py [--json out.json]

On a CUDA device: median time of each kernel and of torch (scaled_dot_product_attention, group_norm +
silu), TFLOP/s (attention) or GB/s (group norm), and the ratio. Without a GPU it says so, runs the
interpreter correctness pass on a few small shapes, and exits 0.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch
from report import emit

# SD-1.5 at 512x512 (64x64 latents), CFG batch 2: (name, B, H, Nq, Nk, D)
ATTENTION = [("self 64x64, 320ch", 2, 8, 4096, 4096, 40), ("cross 64x64, 320ch", 2, 8, 4096, 77, 40),
             ("self 32x32, 640ch", 2, 8, 1024, 1024, 80), ("self 16x16, 1280ch", 2, 8, 256, 256, 160),
             ("cross 16x16, 1280ch", 2, 8, 256, 77, 160)]
GROUP_NORM = [("320ch 64x64", 2, 320, 64), ("640ch 32x32", 2, 640, 32), ("1280ch 16x16", 2, 1280, 16),
              ("vae 128ch 512x512", 1, 128, 512)]


def _cuda_time(fn, repeat=20) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    return statistics.median(times)


def gpu_rows(dtype) -> list[dict]:
    import torch.nn.functional as F

    from ldm_engine.kernels import flash_attention, group_norm

    rows = []
    for name, b, h, nq, nk, d in ATTENTION:
        q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=dtype) for n in (nq, nk, nk))
        flops = 4 * b * h * nq * nk * d
        t_k = _cuda_time(lambda: flash_attention(q, k, v))
        t_t = _cuda_time(lambda: F.scaled_dot_product_attention(q, k, v))
        rows.append({"kernel": "flash_attention", "shape": name, "dtype": str(dtype), "triton_ms": t_k * 1e3,
                     "torch_ms": t_t * 1e3, "triton_tflops": flops / t_k / 1e12, "torch_over_triton": t_t / t_k})
    for name, n, c, s in GROUP_NORM:
        x = torch.randn(n, c, s, s, device="cuda", dtype=dtype)
        w, bias = torch.ones(c, device="cuda", dtype=dtype), torch.zeros(c, device="cuda", dtype=dtype)
        nbytes = 2 * x.numel() * x.element_size()  # one read, one write at the roofline
        t_k = _cuda_time(lambda: group_norm(x, 32, w, bias, 1e-5, silu=True))
        t_t = _cuda_time(lambda: F.silu(F.group_norm(x, 32, w, bias, 1e-5)))
        rows.append({"kernel": "group_norm_silu", "shape": name, "dtype": str(dtype), "triton_ms": t_k * 1e3,
                     "torch_ms": t_t * 1e3, "triton_gb_per_s": nbytes / t_k / 1e9, "torch_over_triton": t_t / t_k})
    return rows


def interpreter_pass() -> list[dict]:
    """Correctness on small shapes under TRITON_INTERPRET=1 (set before the kernels are imported)."""
    import torch.nn.functional as F

    from ldm_engine.kernels import flash_attention, group_norm

    rows = []
    for b, h, nq, nk, d in [(1, 2, 77, 77, 40), (1, 1, 130, 77, 80), (1, 1, 64, 64, 160)]:
        q, k, v = (torch.randn(b, h, n, d) for n in (nq, nk, nk))
        err = (flash_attention(q, k, v) - F.scaled_dot_product_attention(q, k, v)).abs().max().item()
        rows.append({"kernel": "flash_attention", "shape": [b, h, nq, nk, d], "max_abs_diff": err})
    for c in (64, 320, 1280):
        x = torch.randn(2, c, 6, 6)
        w, bias = torch.randn(c), torch.randn(c)
        err = (group_norm(x, 32, w, bias, 1e-5, silu=True) - F.silu(F.group_norm(x, 32, w, bias, 1e-5))).abs().max().item()
        rows.append({"kernel": "group_norm_silu", "shape": [2, c, 6, 6], "max_abs_diff": err})
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    p.add_argument("--json")
    a = p.parse_args()
    if torch.cuda.is_available():
        rows = gpu_rows(getattr(torch, a.dtype))
    else:
        print("no CUDA device: timing needs a GPU; running the interpreter correctness pass instead")
        os.environ.setdefault("TRITON_INTERPRET", "1")
        rows = interpreter_pass()
    emit(rows, a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
