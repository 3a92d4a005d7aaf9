"""Control images in: RGB in [0, 1] at the output size, one batch per ControlNet.

Resizing rule (diffusers' control-image processor, VaeImageProcessor with do_normalize=False): an image
(PIL, path or uint8 array) of another size is stretched to width x height with PIL's Lanczos filter —
the aspect ratio is not kept, so crop first to keep it; a float tensor (B, 3, H, W) or array (H, W, 3)
already in [0, 1] is resized with nearest-neighbour interpolation."""
from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

log = logging.getLogger(__name__)


def control_tensor(image, height: int, width: int) -> torch.Tensor:
    """One control image (or a batch as a tensor) -> (B, 3, height, width) float32 in [0, 1]."""
    if isinstance(image, (str, bytes)) or hasattr(image, "__fspath__"):
        image = Image.open(image)
    if isinstance(image, np.ndarray) and image.dtype == np.uint8:
        image = Image.fromarray(image)
    if isinstance(image, Image.Image):
        _warn_aspect(image.size[1], image.size[0], height, width)
        image = image.convert("RGB")
        if image.size != (width, height):
            image = image.resize((width, height), Image.Resampling.LANCZOS)
        return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None].contiguous()
    if isinstance(image, np.ndarray):
        image = torch.from_numpy(image.astype(np.float32)).permute(2, 0, 1)
    if not isinstance(image, torch.Tensor):
        raise ValueError(f"control_image must be a PIL image, a path, an (H, W, 3) array or a (B, 3, H, W) tensor "
                         f"in [0, 1], got {type(image).__name__}")
    t = (image if image.ndim == 4 else image[None]).float()
    if t.shape[1] != 3:
        raise ValueError(f"control_image tensors are (B, 3, H, W) RGB in [0, 1], got shape {tuple(t.shape)}")
    if t.min() < 0 or t.max() > 1:
        raise ValueError(f"control_image values must be in [0, 1] (got {t.min().item():.3g}..{t.max().item():.3g}); "
                         "map [-1, 1] images with (x + 1) / 2")
    if t.shape[-2:] != (height, width):
        _warn_aspect(t.shape[-2], t.shape[-1], height, width)
        t = F.interpolate(t, size=(height, width))
    return t


def _warn_aspect(h: int, w: int, height: int, width: int) -> None:
    if abs(h * width - w * height) > 0.01 * h * width:
        log.warning("control image %dx%d (WxH) has another aspect ratio than the output %dx%d: it is stretched; "
                    "crop it first to keep its proportions", w, h, width, height)
