"""Triton kernels of ldm_engine (installed as `ldm_engine.kernels`), each beside its launcher; their torch
references are torch.nn.functional.scaled_dot_product_attention and group_norm (+ silu). On a machine
without a GPU they run under Triton's interpreter (TRITON_INTERPRET=1) on CPU tensors."""
from .flash_attention import flash_attention
from .group_norm import group_norm

__all__ = ["flash_attention", "group_norm"]
