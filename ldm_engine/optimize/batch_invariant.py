"""Batch-invariant inference: a sample's output does not depend on what else is in its batch.

On CPU, most UNet layers already give each sample the same bits at any batch size. Two kinds do not:
- the linear layers that see one row per sample — the timestep-embedding MLP and each ResBlock's
  projection of it, (B, C) inputs — run as a matrix-vector product at B = 1 and as a blocked GEMM at
  B > 1, and the two round differently (≈ 4e-7, which a 20-step trajectory can grow to one 8-bit level);
  they are made to compute per row: a row equal to the first (the usual case: every sample of a step
  shares its timestep) is computed once and repeated, other rows one at a time;
- convolutions take another algorithm for a batch of one than for larger batches (seen on the 4-channel
  input conv); a batch of one is run as a batch of two (itself twice) and the first half kept. Guided
  sampling never meets this (its batch is [uncond; cond]); an unguided single image pays its convs twice.
Serving batches unrelated requests together and promises each the image it would get alone; this is what
keeps that promise on the torch backend. The weights are untouched and shared; only the layers' forward
changes, and `restore` takes it back.
"""
from __future__ import annotations

import torch
from torch import nn


class _RowwiseForward:
    """A Linear's forward that handles a (B, C) input one distinct row at a time."""

    def __init__(self, linear: nn.Linear):
        self.original = linear.forward

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.shape[0] == 1:
            return self.original(x)
        if bool((x == x[:1]).all()):  # one timestep for the whole batch: one row, repeated
            return self.original(x[:1]).repeat(x.shape[0], 1)
        return torch.cat([self.original(row) for row in x.split(1)])


class _PairedForward:
    """A convolution's forward that runs a batch of one as a batch of two (the larger-batch algorithm)."""

    def __init__(self, conv: nn.Module):
        self.original = conv.forward

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] != 1:
            return self.original(x)
        return self.original(torch.cat([x, x]))[:1]


_FORWARDS = (_RowwiseForward, _PairedForward)


def make_batch_invariant(module: nn.Module) -> list[nn.Module]:
    """Give every nn.Linear under `module` the per-row forward for (B, C) inputs and every Conv2d the paired
    forward for a batch of one; returns the layers changed (already-changed ones are left as they are)."""
    changed = []
    for layer in module.modules():
        if isinstance(layer.__dict__.get("forward"), _FORWARDS):
            continue
        if isinstance(layer, nn.Linear):
            layer.forward = _RowwiseForward(layer)
        elif isinstance(layer, nn.Conv2d):
            layer.forward = _PairedForward(layer)
        else:
            continue
        changed.append(layer)
    return changed


def restore(layers: list[nn.Module]) -> None:
    """Undo make_batch_invariant on `layers`."""
    for layer in layers:
        if isinstance(layer.__dict__.get("forward"), _FORWARDS):
            del layer.forward
