"""`Pipeline`: text-to-image, image-to-image (SDEdit), inpainting and unconditional / class-conditional
sampling on any backend. The pipeline only calls the backend's encode_text / denoise / decode / encode."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from .backends import make_backend
from .images import to_numpy, to_pil, to_tensor
from .loading import LoadedModel, load_checkpoint
from .sampling import check_sampler, make_plan, run_sampler

log = logging.getLogger(__name__)


@dataclass
class PipelineOutput:
    images: list  # PIL images (output_type="pil"), else an array / tensor
    latents: torch.Tensor  # final latents in the diffusion model's (scaled) space
    seed: int | None = None


class NonFiniteError(RuntimeError):
    """NaN or inf appeared during generation."""


def _check_finite(x: torch.Tensor, stage: str) -> None:
    if not torch.isfinite(x).all():
        raise NonFiniteError(f"NaN or inf in the {stage}; this happens when a reduced precision overflows — "
                             f"run the autoencoder (or the whole model) in float32 (dtype=torch.float32)")


class Pipeline:
    def __init__(self, model: LoadedModel, backend="torch", device="cpu", dtype: torch.dtype | None = None):
        self.model = model
        self.config = model.config
        self.backend = make_backend(backend, model, device, dtype) if isinstance(backend, str) else backend

    @classmethod
    def from_pretrained(cls, path, config=None, backend: str = "torch", dtype: torch.dtype = torch.float32,
                        device: str = "cpu", use_ema: bool = True) -> "Pipeline":
        """A pipeline over anything load_checkpoint reads (single file or diffusers folder)."""
        return cls(load_checkpoint(path, config=config, use_ema=use_ema, dtype=dtype), backend, device, dtype)

    # ---- conditioning ----------------------------------------------------------------------------

    def _text_context(self, prompts: list[str], negative: list[str], guided: bool):
        ids = self.model.tokenizer(prompts + (negative if guided else []))
        ctx = self.backend.encode_text(ids)  # one batch: prompts, then negatives
        return (ctx[: len(prompts)], ctx[len(prompts):]) if guided else (ctx, None)

    def _check_args(self, height, width, steps, strength, guidance_scale, sampler, image, mask_image):
        f = self.config.vae.downsampling_factor * (2 ** (len(self.config.unet.channel_mult) - 1))
        for name, v in (("height", height), ("width", width)):
            if v % f:
                raise ValueError(f"{name} must be a multiple of {f} for this model (autoencoder factor "
                                 f"{self.config.vae.downsampling_factor} x UNet depth), got {v}; try {v // f * f or f}")
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"num_inference_steps must be an integer >= 1, got {steps!r}")
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength must be in [0, 1], got {strength}")
        if guidance_scale < 0:
            raise ValueError(f"guidance_scale must be >= 0, got {guidance_scale}")
        check_sampler(sampler)
        if mask_image is not None and image is None:
            raise ValueError("mask_image needs image (the picture to inpaint)")
        if mask_image is not None and self.config.unet.in_channels != 9:
            raise ValueError(f"inpainting needs an inpainting model (9 UNet input channels); "
                             f"{self.config.name} has {self.config.unet.in_channels}")

    # ---- generation ------------------------------------------------------------------------------

    def __call__(self, prompt: str | list[str] | None = None, negative_prompt: str | list[str] | None = None,
                 height: int | None = None, width: int | None = None, num_inference_steps: int = 50,
                 guidance_scale: float = 7.5, sampler: str = "ddim", eta: float = 0.0, seed: int | None = None,
                 generator: torch.Generator | None = None, latents: torch.Tensor | None = None,
                 num_images_per_prompt: int = 1, image=None, mask_image=None, strength: float = 0.8,
                 class_label: int | list[int] | None = None, output_type: str = "pil",
                 progress: bool = True, callback=None) -> PipelineOutput:
        cfg = self.config
        if image is not None and (height is None or width is None):
            probe = to_tensor(image)
            height, width = height or probe.shape[-2], width or probe.shape[-1]
        height, width = height or cfg.image_size, width or cfg.image_size
        self._check_args(height, width, num_inference_steps, strength, guidance_scale, sampler, image, mask_image)
        if generator is None:
            seed = int(torch.randint(0, 2 ** 31 - 1, ()).item()) if seed is None else seed
            generator = torch.Generator("cpu").manual_seed(seed)

        # conditioning: computed once per call, never per step
        # classifier-free guidance needs a learned "empty" condition: text models have the empty prompt
        guided = guidance_scale != 1.0 and cfg.conditioning == "text"
        extra, context, uncond = {}, None, None
        if cfg.conditioning == "text":
            prompts = [prompt] if isinstance(prompt, str) else list(prompt or [""])
            negative = negative_prompt if negative_prompt is not None else ""
            negative = [negative] * len(prompts) if isinstance(negative, str) else list(negative)
            if len(negative) != len(prompts):
                raise ValueError(f"got {len(negative)} negative prompts for {len(prompts)} prompts")
            context, uncond = self._text_context(prompts, negative, guided)
            batch = len(prompts)
        elif cfg.conditioning == "class":
            if class_label is None:
                raise ValueError(f"{cfg.name} is class-conditional: pass class_label (0..{cfg.num_classes - 1})")
            labels = torch.tensor([class_label] if isinstance(class_label, int) else list(class_label))
            if labels.min() < 0 or labels.max() >= cfg.num_classes:
                raise ValueError(f"class_label must be in [0, {cfg.num_classes - 1}], got {labels.tolist()}")
            context = self.backend.embed_class(labels)
            batch = len(labels)
        else:
            if prompt:
                raise ValueError(f"{cfg.name} is unconditional: it takes no prompt")
            batch = 1
        n = num_images_per_prompt
        if context is not None:
            context = context.repeat_interleave(n, dim=0)
            uncond = uncond.repeat_interleave(n, dim=0) if uncond is not None else None
        batch *= n

        f = cfg.vae.downsampling_factor
        shape = (batch, cfg.vae.embed_dim, height // f, width // f)
        plan = make_plan(sampler, num_inference_steps, cfg.schedule)
        scale = cfg.scale_factor

        init_latents = mask = masked_latents = None
        if image is not None:
            img = to_tensor(image, (height, width))
            if mask_image is not None:
                m = to_tensor(mask_image, (height, width), mode="L")
                if m.shape[-2:] != img.shape[-2:]:
                    raise ValueError(f"mask size {tuple(m.shape[-2:])} differs from image size {tuple(img.shape[-2:])}")
                m = (m >= 0.5).float()
                masked = img * (m < 0.5)
                masked_latents = (self.backend.encode(masked).sample(generator) * scale).repeat(batch // img.shape[0], 1, 1, 1)
                mask = torch.nn.functional.interpolate(m, size=shape[-2:]).repeat(batch // m.shape[0], 1, 1, 1)
            else:
                init_latents = (self.backend.encode(img).sample(generator) * scale).repeat(batch // img.shape[0], 1, 1, 1)

        noise = latents if latents is not None else torch.randn(shape, generator=generator, dtype=torch.float32)
        if init_latents is not None:  # SDEdit: start part-way, from the noised encoding of the image
            start = num_inference_steps - min(int(num_inference_steps * strength), num_inference_steps)
            plan = plan.tail(start)
            if len(plan.timesteps) == 0:
                raise ValueError(f"strength {strength} leaves no denoising step; raise strength or steps")
            x = plan.noised(init_latents, noise)
        else:
            x = plan.initial_latents(noise)

        def model(x_in: torch.Tensor, t) -> torch.Tensor:
            if mask is not None:
                x_in = torch.cat([x_in, mask, masked_latents], dim=1)
            if not guided:
                return self.backend.denoise(x_in, t, context, extra)
            out_u, out_c = self.backend.denoise(torch.cat([x_in, x_in]), t, torch.cat([uncond, context]), extra).chunk(2)
            return out_u + guidance_scale * (out_c - out_u)

        x = run_sampler(sampler, model, x, plan, cfg.prediction_type, eta=eta, generator=generator,
                        callback=callback, disable=not progress)
        _check_finite(x, "latents after sampling")
        if output_type == "latent":
            return PipelineOutput(x, x, seed)
        images = self.backend.decode(x / scale)
        _check_finite(images, "decoded image")
        out = {"pil": to_pil, "np": to_numpy, "pt": lambda t: (t / 2 + 0.5).clamp(0, 1)}
        if output_type not in out:
            raise ValueError(f"output_type must be one of pil, np, pt, latent; got {output_type!r}")
        return PipelineOutput(out[output_type](images), x, seed)
