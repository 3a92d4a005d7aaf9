"""Triton kernels of ldm_engine (installed as `ldm_engine.kernels`), each beside its launcher and
its torch reference."""
