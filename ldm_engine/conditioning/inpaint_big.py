"""The LDM paper's big inpainting model (inpainting_big; Rombach et al. 2022, Sec. 4.5), run as the original
scripts/inpaint.py runs it. Its UNet takes 7 channels: [latent 3, masked-image latent 3, mask 1], where

- the masked image is the image with the area to repaint set to black (-1): (1 - mask) * image in [0, 1],
  then mapped to [-1, 1];
- its latent is the VQ-f4 encoder + quant_conv output before quantisation, unscaled (scale factor 1);
- the mask is binarised at 0.5, mapped to {-1, +1} and resized (nearest) to the latent size.

Sampling starts from pure noise (50 DDIM steps in the script); the decoded image is composited with the
original outside the mask: (1 - mask) * image + mask * clamp(decoded).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..tasks import Start, _skip, load_mask
from .superres import checked_image


def check_args(cfg, image, mask_image, label_map, masked_content: str) -> None:
    if image is None or mask_image is None:
        raise ValueError(f"{cfg.name} is an inpainting model: pass image and mask_image (white = repaint)")
    if label_map is not None:
        raise ValueError(f"{cfg.name} is an inpainting model: it takes no label_map")
    if masked_content != "original":
        raise ValueError(f"{cfg.name} (the LDM inpainting model) sees the masked area as black through its "
                         f"masked-image input; masked_content={masked_content!r} does not apply, leave it 'original'")


def prepare(image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """scripts/inpaint.py's make_batch on an image in [-1, 1] and a {0, 1} mask (1 = repaint), both
    (1, C, H, W): (masked image in [-1, 1] with the hole at -1, mask in {-1, +1})."""
    masked = (1 - mask) * (image + 1) - 1  # ((1 - mask) * (image + 1) / 2) * 2 - 1
    return masked, mask * 2 - 1


def start(backend, plan, image, mask_image, steps: int, strength: float, scale: float, shape: tuple, noise_fn) -> Start:
    """Start latents (B, 3, h, w), the concatenated [masked-image latent, mask] (B, 4, h, w) and the
    composite that ends the call. strength < 1 starts from the image's own latent noised part-way (SDEdit);
    1 (the default, as the script) from pure noise."""
    f = backend.model.config.vae.downsampling_factor
    img = checked_image(image, shape[-2] * f, shape[-1] * f, "image")
    mask = load_mask(mask_image, img.shape[-2:])  # (1, 1, H, W) in {0, 1}
    masked, mask_pm = prepare(img, mask)
    c = backend.encode(masked).mode()  # (1, 3, h, w): pre-quantisation, unscaled
    cc = F.interpolate(mask_pm, size=c.shape[-2:])  # nearest, as the script
    concat = torch.cat([c.float().cpu(), cc], dim=1).repeat(shape[0], 1, 1, 1)
    noise = noise_fn()
    if strength >= 1.0:
        run, x = plan, plan.initial_latents(noise)
    else:
        run = _skip(plan, steps, strength)
        init = backend.encode(img).mode().float().cpu() * scale
        x = run.noised(init.repeat(shape[0], 1, 1, 1), noise)

    def composite(images: torch.Tensor) -> torch.Tensor:
        """Decoded images (B, 3, H, W) in [-1, 1] -> the original outside the mask, the model's output inside."""
        m = mask.to(images.device, images.dtype)
        return (1 - m) * img.to(images.device, images.dtype) + m * images.clamp(-1, 1)

    return Start(x, run, concat=concat, finish=composite)
