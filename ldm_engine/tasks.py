"""How each task makes its start latents and the UNet's extra inputs.

img2img (SDEdit, Meng et al. 2022) starts part-way down the schedule from the noised encoding of an
image; inpainting either concatenates mask + masked-image latents (9-channel models) or, for ordinary
models, blends the known region back in after every step (the LDM code's method); the x4 upscaler
concatenates a noise-augmented low-resolution image and gets its noise level as the class input.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .images import to_tensor
from .sampling import Plan
from .sampling.noise import randn, sample_posterior
from .sampling.schedule import alphas_cumprod_for

MASKED_CONTENT = ("original", "fill", "latent_noise", "latent_nothing")


@dataclass
class Start:
    x: torch.Tensor  # start latents, in the sampler's space
    plan: Plan  # the steps still to run
    concat: torch.Tensor | None = None  # extra UNet input channels (B, C, h, w), same for both CFG halves
    class_labels: torch.Tensor | None = None
    callback: object = None  # per-step hook that may replace the latents
    finish: object = None  # decoded images (B, 3, H, W) in [-1, 1] -> final images (a composite with the input)


def load_image(image, height: int, width: int) -> torch.Tensor:
    img = to_tensor(image)
    if img.shape[-2:] != (height, width):
        img = to_tensor(image, (height, width))
    return img


def load_mask(mask_image, image_hw: tuple[int, int]) -> torch.Tensor:
    """(1, 1, H, W) binary mask, 1 = repaint; it must match the image's size."""
    m = to_tensor(mask_image, mode="L")
    if tuple(m.shape[-2:]) != tuple(image_hw):
        raise ValueError(f"mask size {tuple(m.shape[-2:][::-1])} (W, H) differs from the image size "
                         f"{tuple(image_hw[::-1])}; give a mask of the same size")
    return (m >= 0.5).float()


def default_strength(cfg, mask_image) -> float:
    """diffusers' defaults: 1.0 when a 9-channel inpainting model inpaints (StableDiffusionInpaintPipeline:
    the masked region starts from pure noise), 0.8 for image-to-image (StableDiffusionImg2ImgPipeline); 1.0
    for the 7-channel LDM inpainting model too (its scripts/inpaint.py samples from pure noise)."""
    return 1.0 if mask_image is not None and (cfg.unet.in_channels == 9 or cfg.task == "inpaint") else 0.8


def _skip(plan: Plan, steps: int, strength: float) -> Plan:
    start = steps - min(int(steps * strength), steps)
    plan = plan.tail(start)
    if len(plan.timesteps) == 0:
        raise ValueError(f"strength {strength} with {steps} steps leaves no denoising step; raise either")
    return plan


def txt2img(plan: Plan, noise: torch.Tensor) -> Start:
    return Start(plan.initial_latents(noise), plan)


def img2img(backend, plan, image, steps, strength, scale, shape, generator, noise_fn) -> Start:
    img = load_image(image, shape[-2] * backend_factor(backend), shape[-1] * backend_factor(backend))
    init = sample_posterior(backend.encode(img), generator) * scale  # draws from the generator before the noise
    init = init.repeat(shape[0] // init.shape[0], 1, 1, 1)
    plan = _skip(plan, steps, strength)
    return Start(plan.noised(init, noise_fn()), plan)


def inpaint(backend, plan, image, mask_image, steps, strength, scale, shape, generator, noise_fn,
            concat_mask: bool, masked_content: str = "original") -> Start:
    """`masked_content`: what the masked area starts from before noising (A1111's inpainting_fill):
    the image ("original"), its surroundings' colours ("fill"), noise ("latent_noise"), zeros ("latent_nothing")."""
    if masked_content not in MASKED_CONTENT:
        raise ValueError(f"masked_content must be one of {', '.join(MASKED_CONTENT)}, got {masked_content!r}")
    f = backend_factor(backend)
    img = load_image(image, shape[-2] * f, shape[-1] * f)
    mask = load_mask(mask_image, img.shape[-2:])
    full = strength >= 1.0
    small = F.interpolate(mask, size=shape[-2:])  # latent-size mask, nearest
    init = None
    if not concat_mask or not full:  # the image's own latents are needed (draws before the noise)
        source = fill_from_surroundings(img, mask) if masked_content == "fill" else img
        init = sample_posterior(backend.encode(source), generator) * scale
        init = init.repeat(shape[0] // init.shape[0], 1, 1, 1)
        if masked_content == "latent_noise":
            init = (1 - small) * init + small * randn(init.shape, generator)
        elif masked_content == "latent_nothing":
            init = (1 - small) * init
    reps = shape[0] // img.shape[0]
    small = small.repeat(reps, 1, 1, 1)
    noise = noise_fn()
    run = plan if full else _skip(plan, steps, strength)
    x = run.initial_latents(noise) if full else run.noised(init, noise)
    if concat_mask:
        masked = img * (mask < 0.5)
        masked_latents = sample_posterior(backend.encode(masked), generator) * scale
        masked_latents = masked_latents.repeat(shape[0] // masked_latents.shape[0], 1, 1, 1)
        return Start(x, run, concat=torch.cat([small, masked_latents], dim=1))

    def blend(info):
        """Keep the known region: the image's latents noised to the next step's level."""
        i = info["i"]
        known = run.tail(i + 1).noised(init, noise) if i + 1 < len(run.timesteps) else init
        return (1 - small) * known + small * info["x"]

    return Start(x, run, callback=blend)


def upscale(backend, plan, image, noise_level, cfg, shape, generator, noise_fn) -> Start:
    """x4 upscaler: the low-res image (at latent size) gets noise at `noise_level` of its own schedule
    and is concatenated to the latents; the level is also the UNet's class input."""
    if not 0 <= noise_level <= cfg.max_noise_level:
        raise ValueError(f"noise_level must be in [0, {cfg.max_noise_level}], got {noise_level}")
    low = load_image(image, shape[-2], shape[-1])
    abar = float(alphas_cumprod_for(cfg.noise_aug_schedule)[noise_level])
    noise = randn((len(generator), *low.shape[1:]) if isinstance(generator, (list, tuple)) else low.shape, generator)
    low = abar ** 0.5 * low + (1 - abar) ** 0.5 * noise
    low = low.repeat(shape[0] // low.shape[0], 1, 1, 1)
    return Start(plan.initial_latents(noise_fn()), plan, concat=low,
                 class_labels=torch.full((shape[0],), noise_level, dtype=torch.long))


def fill_from_surroundings(img: torch.Tensor, mask: torch.Tensor, levels: int = 6) -> torch.Tensor:
    """The masked area of `img` (1, 3, H, W) painted with the colours around it (A1111's "fill"): normalized
    average pooling of the known pixels, from coarse to fine, so each hole pixel takes the nearest known colour
    at the finest scale that has one. mask (1, 1, H, W): 1 = repaint."""
    known = 1.0 - mask
    out = (img * known).sum((2, 3), keepdim=True) / known.sum().clamp(min=1.0)  # the mean known colour
    out = out.expand_as(img).clone()
    h, w = img.shape[-2:]
    for level in range(levels, -1, -1):
        k = 2 ** level
        if k > min(h, w):
            continue
        num = F.avg_pool2d(img * known, k, ceil_mode=True)
        den = F.avg_pool2d(known, k, ceil_mode=True)
        coarse = F.interpolate(num / den.clamp(min=1e-6), size=(h, w), mode="nearest")
        has = F.interpolate((den > 0).float(), size=(h, w), mode="nearest")
        out = has * coarse + (1 - has) * out
    return known * img + mask * out


def backend_factor(backend) -> int:
    return backend.model.config.vae.downsampling_factor
