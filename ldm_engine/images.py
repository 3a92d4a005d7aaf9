"""Images in and out: PIL / numpy <-> tensors in [-1, 1], PNGs with their generation parameters."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image, PngImagePlugin


def to_tensor(image, size: tuple[int, int] | None = None, mode: str = "RGB") -> torch.Tensor:
    """PIL image, path or HxWxC uint8 array -> (1, C, H, W) float tensor in [-1, 1] (masks: [0, 1])."""
    if isinstance(image, torch.Tensor):
        return image if image.ndim == 4 else image[None]
    if isinstance(image, (str, bytes)) or hasattr(image, "__fspath__"):
        image = Image.open(image)
    if isinstance(image, np.ndarray):
        try:
            image = Image.fromarray(image)
        except TypeError:  # PIL takes uint8 (H, W, 3|4) and 2-D arrays; say so instead of its dtype tuple
            raise ValueError(f"image arrays must be uint8 (H, W, 3) or (H, W), got shape {image.shape} "
                             f"{image.dtype}; pass float data as a tensor in [-1, 1]") from None
    image = image.convert(mode)
    if size is not None and image.size != (size[1], size[0]):
        image = image.resize((size[1], size[0]), Image.Resampling.LANCZOS)
    arr = np.asarray(image, dtype=np.float32) / 255.0
    arr = arr[..., None] if arr.ndim == 2 else arr
    t = torch.from_numpy(arr).permute(2, 0, 1)[None].contiguous()
    return t if mode == "L" else t * 2.0 - 1.0


def to_numpy(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) float32 in [0, 1]."""
    return (images / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy()


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    return [Image.fromarray((a * 255).round().astype(np.uint8)) for a in to_numpy(images)]


def save_png(image: Image.Image, path, parameters: dict, infotext: str | None = None) -> None:
    """Write a PNG with the generation parameters as text chunks: one per key, plus `parameters` (the
    A1111 infotext when given, see ldm_engine.infotext; else the pairs joined with '; '). `path`: a file path or
    a binary file object."""
    info = PngImagePlugin.PngInfo()
    for k, v in parameters.items():
        info.add_text(k, str(v))
    info.add_text("parameters", infotext if infotext is not None else "; ".join(f"{k}: {v}" for k, v in parameters.items()))
    image.save(path, format="PNG", pnginfo=info)  # format: `path` may be a file object (BytesIO)
