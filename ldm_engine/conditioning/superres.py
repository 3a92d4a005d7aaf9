"""LDM super-resolution (the paper's bsr_sr model; Rombach et al. 2022, Sec. 4.4; diffusers'
LDMSuperResolutionPipeline): the low-resolution image in [-1, 1] is concatenated to a VQ-f4 latent of its
own size — no noise augmentation, no noise-level input — so the decoded output is 4x the input. The
original samples it with DDIM, 100 steps, eta 1 (notebook_helpers.py); beyond the training size in
overlapping patches or convolutionally (conditioning/patches.py)."""
from __future__ import annotations

import numpy as np
import torch

from ..images import to_tensor
from ..tasks import Start


def checked_image(image, height: int, width: int, what: str = "image") -> torch.Tensor:
    """(1, 3, height, width) in [-1, 1] from a PIL image / path / uint8 array (resized to that size with
    Lanczos) or a (3, H, W) / (1, 3, H, W) tensor in [-1, 1] (which must already have it); a clear error for
    anything else (other channel counts, batches, NaN, values outside [-1, 1], a size that does not fit)."""
    if isinstance(image, torch.Tensor):
        img = image if image.ndim == 4 else image[None] if image.ndim == 3 else None
        if img is None or img.shape[1] != 3:
            raise ValueError(f"{what} must be a (3, H, W) or (1, 3, H, W) tensor in [-1, 1], got shape "
                             f"{tuple(image.shape)}")
        if img.shape[0] != 1:
            raise ValueError(f"{what} holds {img.shape[0]} images; pass one (num_images_per_prompt makes several)")
        if not torch.isfinite(img).all():
            raise ValueError(f"{what} contains NaN or inf values")
        if img.min() < -1.001 or img.max() > 1.001:
            raise ValueError(f"{what} tensor values must be in [-1, 1], got [{img.min():.3g}, {img.max():.3g}]; "
                             "scale a [0, 1] image with x * 2 - 1")
        if tuple(img.shape[-2:]) != (height, width):
            raise ValueError(f"{what} is {img.shape[-1]}x{img.shape[-2]} (W x H) but {width}x{height} was asked "
                             "for; resize the tensor or leave height and width unset")
        return img.float()
    if isinstance(image, np.ndarray) and (image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] not in (3, 4)):
        raise ValueError(f"{what} array must be (H, W, 3) uint8 RGB, got shape {tuple(image.shape)} {image.dtype}; "
                         "pass float data as a tensor in [-1, 1]")
    img = to_tensor(image)
    return img if tuple(img.shape[-2:]) == (height, width) else to_tensor(image, (height, width))


def check_args(cfg, image, mask_image, label_map) -> None:
    if image is None:
        raise ValueError(f"{cfg.name} is a super-resolution model: pass image (the low-resolution picture; "
                         "the output is 4x its size)")
    if mask_image is not None or label_map is not None:
        raise ValueError(f"{cfg.name} is a super-resolution model: it takes image only, not mask_image or label_map")


def start(plan, image, shape: tuple, noise_fn) -> Start:
    """Pure-noise start latents (B, 3, h, w); the low-res image (B, 3, h, w) is the concatenated condition."""
    low = checked_image(image, shape[-2], shape[-1], "image")
    return Start(plan.initial_latents(noise_fn()), plan, concat=low.repeat(shape[0], 1, 1, 1))
