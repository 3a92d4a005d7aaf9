"""Optimizations applied to the reference modules from outside: module swaps, never edits."""
from .kernel_swap import use_triton_kernels

__all__ = ["use_triton_kernels"]
