"""`Pipeline`: text-to-image, image-to-image (SDEdit), inpainting and unconditional / class-conditional
sampling on any backend. The pipeline only calls the backend's encode_text / denoise / decode / encode."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from .backends import make_backend
from .defaults import default_model
from . import tasks
from .images import to_numpy, to_pil, to_tensor
from .loading import LoadedModel, load_checkpoint
from .sampling import check_sampler, make_plan, native, run_sampler
from .vae_tiling import decode_tiled

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
    def __init__(self, model: LoadedModel, backend="torch", device="cpu", dtype: torch.dtype | None = None,
                 scheduler: str = "cpp", **backend_options):
        if scheduler not in ("cpp", "python"):
            raise ValueError(f"scheduler must be 'cpp' (the native loop) or 'python', got {scheduler!r}")
        self.model = model
        self.config = model.config
        self.scheduler = scheduler
        self.vae_tiling: tuple[int, int] | None = None  # (tile, overlap) once enable_vae_tiling() is called
        self._graphs = None  # CUDA-graph loop, made on first use on a CUDA device
        self.backend = (make_backend(backend, model, device, dtype, **backend_options) if isinstance(backend, str)
                        else backend)

    @classmethod
    def from_pretrained(cls, path=None, config=None, backend: str = "torch", dtype: torch.dtype | None = None,
                        device: str = "cpu", use_ema: bool = True, scheduler: str = "cpp",
                        **backend_options) -> "Pipeline":
        """A pipeline over anything load_checkpoint reads (single file or diffusers folder); with no path,
        the embedded default model (64x64 shapes, e.g. "a red circle on a blue background").
        `dtype` None: the backend's own default (torch: float32; openvino: bf16 where the CPU has it).
        `backend_options` go to the backend (torch: kernels="triton" swaps in the Triton kernels;
        onnxruntime/openvino: onnx_dir, cache_dir, threads; openvino: reshape)."""
        path = default_model() if path is None else path
        weights_dtype = dtype if backend == "torch" and dtype is not None else torch.float32  # graphs export from fp32
        return cls(load_checkpoint(path, config=config, use_ema=use_ema, dtype=weights_dtype), backend, device, dtype,
                   scheduler, **backend_options)

    # ---- conditioning ----------------------------------------------------------------------------

    def _text_context(self, prompts: list[str], negative: list[str], guided: bool):
        ids = self.model.tokenizer(prompts + (negative if guided else []))
        ctx = self.backend.encode_text(ids)  # one batch: prompts, then negatives
        return (ctx[: len(prompts)], ctx[len(prompts):]) if guided else (ctx, None)

    def _check_args(self, height, width, steps, strength, guidance_scale, sampler, image, mask_image):
        cfg = self.config
        # the latent side must survive the UNet's downsamplings; an upscaler's latent is the input image
        f = (1 if cfg.task == "upscale" else cfg.vae.downsampling_factor) * (2 ** (len(cfg.unet.channel_mult) - 1))
        for name, v in (("height", height), ("width", width)):
            if v % f:
                raise ValueError(f"{name} must be a multiple of {f} for this model, got {v}; try {v // f * f or f}")
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"num_inference_steps must be an integer >= 1, got {steps!r}")
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength must be in [0, 1], got {strength}")
        if guidance_scale < 0:
            raise ValueError(f"guidance_scale must be >= 0, got {guidance_scale}")
        check_sampler(sampler)
        if mask_image is not None and image is None:
            raise ValueError("mask_image needs image (the picture to inpaint)")
        if mask_image is not None and cfg.conditioning == "none":
            raise ValueError(f"{cfg.name} is an unconditional model and cannot inpaint; use an SD or inpainting model")
        if cfg.task == "inpaint" and mask_image is None:
            raise ValueError(f"{cfg.name} is an inpainting model: pass image and mask_image")
        if cfg.task == "upscale" and image is None:
            raise ValueError(f"{cfg.name} is an upscaler: pass the low-resolution image")

    def _graph_loop_run(self, sampler, raw_model, start, prediction, guided, guidance, eta, generator):
        """CUDA: every input the captured graph reads must already live on the device."""
        from .sampling.cuda_graph import CudaGraphLoop

        if self._graphs is None:
            self._graphs = CudaGraphLoop()
        dev = self.backend.device
        if start.concat is not None:
            start.concat = start.concat.to(dev)
        return self._graphs.run(sampler, raw_model, start.x.to(dev), start.plan, prediction, guided, guidance, eta,
                                generator).cpu()

    def enable_vae_tiling(self, tile: int = 64, overlap: int = 16) -> None:
        """Decode latents larger than `tile` (latent pixels) in overlapping tiles: bounded memory."""
        self.vae_tiling = (tile, overlap)

    def disable_vae_tiling(self) -> None:
        self.vae_tiling = None

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images in [-1, 1] (tiled when enabled and the latent exceeds a tile)."""
        z = latents / self.config.scale_factor
        if self.vae_tiling and max(z.shape[-2:]) > self.vae_tiling[0]:
            return decode_tiled(self.backend.decode, z, self.config.vae.downsampling_factor, *self.vae_tiling)
        return self.backend.decode(z)

    # ---- generation ------------------------------------------------------------------------------

    def __call__(self, prompt: str | list[str] | None = None, negative_prompt: str | list[str] | None = None,
                 height: int | None = None, width: int | None = None, num_inference_steps: int = 50,
                 guidance_scale: float = 7.5, sampler: str = "ddim", eta: float = 0.0, seed: int | None = None,
                 generator: torch.Generator | None = None, latents: torch.Tensor | None = None,
                 num_images_per_prompt: int = 1, image=None, mask_image=None, strength: float = 0.8,
                 noise_level: int = 20, class_label: int | list[int] | None = None, output_type: str = "pil",
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
        if cfg.task == "upscale":  # the latent is the size of the low-res image; the output f times larger
            height, width = height * f, width * f
        shape = (batch, cfg.vae.embed_dim, height // f, width // f)
        plan = make_plan(sampler, num_inference_steps, cfg.schedule)
        scale = cfg.scale_factor

        def noise_fn() -> torch.Tensor:
            if latents is not None:
                if tuple(latents.shape) != shape:
                    raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
                return latents.float()
            return torch.randn(shape, generator=generator, dtype=torch.float32)

        if cfg.task == "upscale":
            start = tasks.upscale(self.backend, plan, image, noise_level, cfg, shape, generator, noise_fn)
        elif mask_image is not None:
            start = tasks.inpaint(self.backend, plan, image, mask_image, num_inference_steps, strength, scale, shape,
                                  generator, noise_fn, concat_mask=cfg.unet.in_channels == 9)
        elif image is not None:
            start = tasks.img2img(self.backend, plan, image, num_inference_steps, strength, scale, shape,
                                  generator, noise_fn)
        else:
            start = tasks.txt2img(plan, noise_fn())
        if start.class_labels is not None:
            extra["class_labels"] = torch.cat([start.class_labels] * (2 if guided else 1)).to(self.backend.device)

        cfg_context = torch.cat([uncond, context]) if guided else context  # built once, not per step

        def raw_model(x_in: torch.Tensor, t) -> torch.Tensor:
            """The UNet on the CFG batch: [uncond; cond] outputs when guided."""
            if start.concat is not None:
                x_in = torch.cat([x_in, start.concat], dim=1)
            return self.backend.denoise(torch.cat([x_in, x_in]) if guided else x_in, t, cfg_context, extra)

        def model(x_in: torch.Tensor, t) -> torch.Tensor:
            out = raw_model(x_in, t)
            if not guided:
                return out
            out_u, out_c = out.chunk(2)
            return out_u + guidance_scale * (out_c - out_u)

        def on_step(info):
            if start.callback is not None:
                info["x"] = start.callback(info)
            if callback is not None:
                callback(info)
            return info["x"]

        # The native loop runs whole trajectories; per-step hooks (latent blending, callbacks) need Python.
        native_ok = (self.scheduler == "cpp" and native.available(sampler) and start.callback is None
                     and callback is None and cfg.prediction_type in ("eps", "v"))
        if native_ok and self.backend.device.type == "cuda" and getattr(self.backend, "graph_capturable", False):
            x = self._graph_loop_run(sampler, raw_model, start, cfg.prediction_type, guided, guidance_scale, eta, generator)
        elif native_ok:
            x = native.run_native(sampler, raw_model, start.x, start.plan, cfg.prediction_type, guided, guidance_scale,
                                  eta, generator, disable=not progress)
        else:
            x = run_sampler(sampler, model, start.x, start.plan, cfg.prediction_type, eta=eta, generator=generator,
                            callback=on_step, disable=not progress)
        _check_finite(x, "latents after sampling")
        if output_type == "latent":
            return PipelineOutput(x, x, seed)
        images = self.decode(x)
        _check_finite(images, "decoded image")
        out = {"pil": to_pil, "np": to_numpy, "pt": lambda t: (t / 2 + 0.5).clamp(0, 1)}
        if output_type not in out:
            raise ValueError(f"output_type must be one of pil, np, pt, latent; got {output_type!r}")
        return PipelineOutput(out[output_type](images), x, seed)
