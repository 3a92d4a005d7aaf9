"""Gaussian noise from one generator per batch, or from one generator per sample.

A list of generators (one per sample along dim 0) draws each sample's noise from its own generator, in
the same order and shape (1, ...) as a batch of one would: sample i of a batched run then starts from —
and, for stochastic samplers, is perturbed by — exactly the noise a run of that sample alone gets. That
is what lets a server batch requests with different seeds (A1111's per-image `seed + i`) and still give
each one the image it would get on its own; diffusers accepts such lists for the same reason.
"""
from __future__ import annotations

import torch

Generators = torch.Generator | list[torch.Generator] | None


def generators_for(seeds: list[int]) -> list[torch.Generator]:
    """One CPU generator per seed (CPU so that a seed gives the same noise on every device)."""
    return [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]


def randn(shape, generator: Generators = None, dtype: torch.dtype = torch.float32,
          device: torch.device | str | None = None) -> torch.Tensor:
    """Standard normal noise of `shape` on `device` (default: the generator's, else CPU)."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}; give one per sample")
        one = (1, *shape[1:])
        out = torch.cat([torch.randn(one, generator=g, dtype=dtype, device=g.device).to(device or g.device)
                         for g in generator])
        return out
    source = generator.device if generator is not None else (device or "cpu")
    return torch.randn(tuple(shape), generator=generator, dtype=dtype, device=source).to(device or source)


def sample_posterior(posterior, generator: Generators) -> torch.Tensor:
    """A draw from an autoencoder posterior of batch 1; with a list, one draw per generator (B, ...)."""
    if isinstance(generator, (list, tuple)):
        return torch.cat([posterior.sample(g) for g in generator])
    return posterior.sample(generator)
