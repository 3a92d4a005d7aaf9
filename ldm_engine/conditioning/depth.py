"""SD 2 depth-to-image (Stability AI's `512-depth-ema`, `LatentDepth2ImageDiffusion`): a depth map is the
UNet's fifth input channel, beside the 4 latent channels, the same in both classifier-free-guidance halves.

The original model estimates the depth with MiDaS (DPT-Hybrid; Ranftl et al., "Vision Transformers for
Dense Prediction", ICCV 2021) from the input image; those weights ride along in the checkpoint as
`depth_model.*`. Here the caller gives the depth map (`depth_map=`) and those weights are not loaded.
The map is prepared as the original inference scripts (scripts/gradio/depth2img.py,
scripts/streamlit/depth2img.py) and diffusers' `StableDiffusionDepth2ImgPipeline.prepare_depth_map` do:

    d (N, 1, H, W) --bicubic, align_corners=False--> (N, 1, h, w)      h, w: the latent size
    d <- 2 (d - min d) / (max d - min d) - 1                              min / max over each map

Values follow MiDaS' convention, relative inverse depth: larger = nearer (white = near in a depth image).
Training divided by (max - min + 0.001); the inference scripts and diffusers divide by (max - min), which
is followed here. A map that is flat at the latent size (range <= FLAT_RANGE of its magnitude, i.e. a
constant map up to the float rounding of the resize) would make that division 0 / 0 or amplify rounding
noise into structure: it is refused.

With `image=` it is image-to-image (SDEdit, as StableDiffusionImg2ImgPipeline, default strength 0.8).
Without, sampling starts from pure noise with the depth map as the only structure: the original scripts'
strength-1 path (`do_full_sample`), which draws fresh noise instead of encoding the image.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .. import tasks

FLAT_RANGE = 1e-5  # max - min at or below this fraction of max(|min|, |max|): a flat (constant) map
_KEEP_MODES = ("L", "I", "I;16", "I;16B", "I;16L", "F")  # grey images read as their values; others as grey


def check_args(cfg, depth_map, mask_image) -> None:
    """Refuse depth input for other models, a depth model's call without one, and a malformed depth map."""
    if cfg.task != "depth":
        if depth_map is not None:
            raise ValueError(f"{cfg.name} is not a depth-to-image model: depth_map applies only to SD 2 depth "
                             "models (preset sd-2-depth); leave it unset")
        return
    if depth_map is None:
        raise ValueError(f"{cfg.name} is a depth-to-image model: pass depth_map= (an (H, W) array or tensor, or a "
                         "depth image; larger = nearer, as MiDaS / DPT write it). The depth estimator stored in "
                         "original checkpoints is not run")
    if mask_image is not None:
        raise ValueError(f"{cfg.name} is a depth-to-image model and does not inpaint: leave mask_image unset")
    load_depth_map(depth_map)  # its form, shape and values, before any work (the rest needs the batch size)


def _as_tensor(depth_map) -> torch.Tensor:
    """Any accepted form -> a float32 CPU tensor of the given shape."""
    if isinstance(depth_map, (str, bytes)) or hasattr(depth_map, "__fspath__"):
        try:
            depth_map = Image.open(depth_map)
        except FileNotFoundError:
            raise ValueError(f"depth_map file {str(depth_map)!r} does not exist") from None
        except OSError as e:  # not an image PIL can read
            raise ValueError(f"depth_map file {str(depth_map)!r} is not a readable image ({e})") from None
    if isinstance(depth_map, Image.Image):
        img = depth_map if depth_map.mode in _KEEP_MODES else depth_map.convert("L")
        return torch.from_numpy(np.asarray(img).astype(np.float32))
    if isinstance(depth_map, np.ndarray):
        if depth_map.dtype.kind not in "biuf":
            raise ValueError(f"depth_map must hold real numbers, got an array of dtype {depth_map.dtype}")
        return torch.from_numpy(depth_map.astype(np.float32))
    if isinstance(depth_map, torch.Tensor):
        if depth_map.is_complex():
            raise ValueError(f"depth_map must hold real numbers, got a tensor of dtype {depth_map.dtype}")
        return depth_map.detach().to("cpu", torch.float32)
    raise ValueError(f"depth_map must be an array, a tensor, a PIL image, an image path or a list of those; "
                     f"got {type(depth_map).__name__}")


def load_depth_map(depth_map) -> torch.Tensor:
    """(N, 1, H, W) float32 from an (H, W), (N, H, W) or (N, 1, H, W) array / tensor, a depth image (PIL or
    path; 16-bit and float images keep their values, colour images are read as grey), or a list of maps."""
    if isinstance(depth_map, (list, tuple)):
        if not depth_map:
            raise ValueError("depth_map is an empty list; give one depth map, or one per image")
        maps = [load_depth_map(d) for d in depth_map]
        sizes = sorted({tuple(m.shape[-2:]) for m in maps})
        if len(sizes) > 1:
            raise ValueError(f"the depth maps of the list differ in size (H, W): {sizes}; give maps of one size")
        return torch.cat(maps)
    d = _as_tensor(depth_map)
    shape = tuple(d.shape)
    if d.ndim == 3 and shape[-1] in (3, 4) and min(shape[:2]) > 4:
        raise ValueError(f"depth_map of shape {shape} looks like an (H, W, C) colour image; give a single-channel "
                         "(H, W) depth array, or the image itself (it is read as grey)")
    if d.ndim == 2:
        d = d[None, None]
    elif d.ndim == 3:
        d = d[:, None]
    elif not (d.ndim == 4 and shape[1] == 1):
        raise ValueError(f"depth_map must have shape (H, W), (N, H, W) or (N, 1, H, W); got {shape}")
    if d.numel() == 0:
        raise ValueError(f"depth_map of shape {shape} is empty")
    if not torch.isfinite(d).all():
        bad = int((~torch.isfinite(d)).sum())
        raise ValueError(f"depth_map has {bad} NaN or infinite value(s) of {d.numel()}; fill them (for example "
                         "with the nearest valid depth) first")
    return d


def prepare_depth(depth_map, latent_hw: tuple[int, int], batch: int) -> torch.Tensor:
    """The UNet's depth channel (batch, 1, h, w) in [-1, 1]: resized bicubically to the latent size, then
    min-max normalised per map. One map serves every image; else one per image."""
    d = load_depth_map(depth_map)
    n = d.shape[0]
    if n not in (1, batch):
        raise ValueError(f"{n} depth maps for {batch} images; give one for all, or one per image")
    h, w = latent_hw
    d = F.interpolate(d, size=(h, w), mode="bicubic", align_corners=False)  # (N, 1, h, w)
    lo, hi = d.amin(dim=(1, 2, 3), keepdim=True), d.amax(dim=(1, 2, 3), keepdim=True)
    flat = ((hi - lo) <= FLAT_RANGE * torch.maximum(lo.abs(), hi.abs())).flatten()
    if flat.any():
        i = int(flat.nonzero()[0])
        raise ValueError(f"depth map {i} is flat (values {float(lo.flatten()[i]):g} to {float(hi.flatten()[i]):g}) at "
                         f"the latent size {h}x{w}: its min-max normalisation has nothing to stretch. Give a depth "
                         "map with depth variation (larger = nearer)")
    d = 2.0 * (d - lo) / (hi - lo) - 1.0
    return d.repeat(batch // n, 1, 1, 1)


def depth2img(backend, plan, image, depth_map, steps, strength, scale, shape, generator, noise_fn) -> tasks.Start:
    """Start latents and the depth channel: image-to-image from `image` at `strength`, or pure noise
    without an image. The depth map is checked before the image is encoded."""
    depth = prepare_depth(depth_map, shape[-2:], shape[0])
    if image is None:
        start = tasks.txt2img(plan, noise_fn())
    else:
        start = tasks.img2img(backend, plan, image, steps, strength, scale, shape, generator, noise_fn)
    start.concat = depth
    return start
