"""Semantic synthesis (Rombach et al. 2022, Sec. 4.3.2; CompVis configs semantic_synthesis256/512): an image
drawn from a label map. The map holds one class id per pixel at the output size; as a one-hot map
(B, classes, H, W) — the original datasets' `np.eye(n_labels)[segmentation]` — it goes through the model's
SpatialRescaler (models/spatial_rescaler.py: bilinear x0.5 twice, then a bias-free 1x1 conv to 3 channels)
to the VQ-f4 latent's size, and is concatenated to the latent. Larger maps than the training size (256² /
512²; the paper's landscapes at 1024x384) are sampled convolutionally or in patches (conditioning/patches.py).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..tasks import Start

_ID_MODES = ("L", "P", "I", "I;16", "I;16B", "I;16L", "1", "F")  # single-channel PIL modes


def _ids_from_array(a: np.ndarray, num_classes: int) -> torch.Tensor:
    if a.dtype == np.bool_:
        a = a.astype(np.int64)
    if np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all():
            raise ValueError("label_map contains NaN or inf values; it must hold integer class ids")
        if (a != np.round(a)).any():
            raise ValueError("label_map holds non-integer values; it must hold integer class ids "
                             f"(0..{num_classes - 1}), or be a one-hot (H, W, {num_classes}) array")
    elif not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"label_map must hold integer class ids, got dtype {a.dtype}")
    ids = torch.from_numpy(a.astype(np.int64))
    bad = ids[(ids < 0) | (ids >= num_classes)]
    if bad.numel():
        shown = ", ".join(str(v) for v in bad.unique()[:5].tolist())
        raise ValueError(f"label_map has class ids out of range [0, {num_classes - 1}]: {shown} "
                         f"({bad.numel()} pixels); this model knows {num_classes} classes")
    return ids


def read_label_map(label_map, num_classes: int) -> torch.Tensor:
    """A label map -> (H, W) int64 class ids, or (1, classes, H, W) float32 for a one-hot / soft map.
    Accepted: a single-channel image or its path (integer PNG, mode L / P / I), a (H, W) integer array or
    tensor, or a one-hot (H, W, classes) array or tensor (the original datasets' layout)."""
    if isinstance(label_map, (str, Path)):
        if not Path(label_map).is_file():
            raise FileNotFoundError(f"label map {label_map}: no such file")
        label_map = Image.open(label_map)
    if isinstance(label_map, Image.Image):
        if label_map.mode not in _ID_MODES:
            raise ValueError(f"a label map holds one class id per pixel (a single-channel image: mode L, P or I); got "
                             f"a mode {label_map.mode} image with {len(label_map.getbands())} channels")
        label_map = np.asarray(label_map)
    if isinstance(label_map, torch.Tensor):
        label_map = label_map.detach().cpu().numpy()
    if not isinstance(label_map, np.ndarray):
        raise ValueError(f"label_map must be an image, a path, or a (H, W) / (H, W, {num_classes}) array; "
                         f"got {type(label_map).__name__}")
    if label_map.ndim == 2:
        return _ids_from_array(label_map, num_classes)
    if label_map.ndim != 3:
        raise ValueError(f"label_map must be (H, W) class ids or a one-hot (H, W, {num_classes}) map, got shape "
                         f"{label_map.shape}")
    if label_map.shape[-1] != num_classes:
        raise ValueError(f"the one-hot label_map has {label_map.shape[-1]} classes (its last axis, shape "
                         f"{label_map.shape}); this model takes {num_classes}")
    onehot = torch.from_numpy(np.asarray(label_map, dtype=np.float32))
    if not torch.isfinite(onehot).all():
        raise ValueError("label_map contains NaN or inf values")
    return onehot.permute(2, 0, 1)[None].contiguous()


def output_size(labels: torch.Tensor, height, width, multiple: int) -> tuple[int, int]:
    """The image size a label map asks for: its own. Given height / width must agree with it."""
    h, w = labels.shape[-2:]
    if (height is not None and height != h) or (width is not None and width != w):
        raise ValueError(f"the label map is {w}x{h} (W x H) and sets the output size; got height={height}, "
                         f"width={width} — leave them unset or resize the label map (nearest neighbour)")
    if h % multiple or w % multiple:
        raise ValueError(f"the label map is {w}x{h} (W x H); its sides must be multiples of {multiple} for this "
                         f"model: crop or pad it, e.g. to {max(w // multiple, 1) * multiple}x"
                         f"{max(h // multiple, 1) * multiple}")
    return h, w


def check_args(cfg, image, mask_image, label_map) -> None:
    if label_map is None:
        raise ValueError(f"{cfg.name} is a semantic synthesis model: pass label_map (class ids 0.."
                         f"{cfg.spatial_rescaler.in_channels - 1}, one per pixel, at the output size)")
    if image is not None or mask_image is not None:
        raise ValueError(f"{cfg.name} is a semantic synthesis model: it takes label_map only, not image or mask_image")


def condition(stage: torch.nn.Module, labels: torch.Tensor) -> torch.Tensor:
    """(1, 3, h, w) float32 on the CPU: the conditioning stage on class ids (H, W) or a one-hot map."""
    p = next(stage.parameters())
    with torch.no_grad():
        out = stage.encode_ids(labels.to(p.device)) if labels.ndim == 2 else stage(labels.to(p.device, p.dtype))
    return out.float().cpu()


def start(stage, plan, labels: torch.Tensor, shape: tuple, noise_fn) -> Start:
    """Pure-noise start latents (B, 3, h, w); the rescaled label map (B, 3, h, w) is the concatenated condition."""
    c = condition(stage, labels)
    if tuple(c.shape[-2:]) != tuple(shape[-2:]):
        raise ValueError(f"the conditioning stage made a {tuple(c.shape[-2:])} map for a {tuple(shape[-2:])} latent; "
                         "the label map must be at the output size")
    return Start(plan.initial_latents(noise_fn()), plan, concat=c.repeat(shape[0], 1, 1, 1))
