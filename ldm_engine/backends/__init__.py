"""Backends: the same three callables (text encoder, UNet, autoencoder) served by different runtimes."""
from .torch_backend import TorchBackend

BACKENDS = {"torch": TorchBackend}


def make_backend(name: str, model, device="cpu", dtype=None, **options):
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; available here: {', '.join(BACKENDS)}")
    return BACKENDS[name](model, device=device, dtype=dtype, **options)


__all__ = ["BACKENDS", "TorchBackend", "make_backend"]
