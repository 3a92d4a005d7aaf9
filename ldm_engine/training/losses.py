"""Reconstruction losses that need no downloaded network."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def gradient_l1(x: torch.Tensor, y: torch.Tensor, scales: int = 2) -> torch.Tensor:
    """L1 between image gradients at several scales: sharp edges matter, not only mean colour."""
    loss = x.new_zeros(())
    for s in range(scales):
        if s:
            x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
        for dim in (-1, -2):
            loss = loss + (x.diff(dim=dim) - y.diff(dim=dim)).abs().mean()
    return loss


def ema_update(ema: dict[str, torch.Tensor], module: torch.nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * weights (Polyak averaging of the trained weights)."""
    with torch.no_grad():
        for k, v in module.state_dict().items():
            if v.is_floating_point():
                ema[k].mul_(decay).add_(v, alpha=1 - decay)
