"""`Pipeline`: text-to-image, image-to-image (SDEdit), inpainting and unconditional / class-conditional
sampling on any backend. The pipeline only calls the backend's encode_text / denoise / decode / encode."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from .adapters import LoraManager, restores_prompt_loras
from .backends import check_int8, make_backend
from .control.manager import ControlNets
from .defaults import default_model
from . import tasks
from .conditioning import depth
from .conditioning.layout import check_args as check_layout, layout_context
from .conditioning import inpaint_big, patches, semantic, superres
from .images import to_numpy, to_pil, to_tensor
from .loading import LoadedModel, load_checkpoint
from .prompts.encode import PromptEncoder
from .models.unet import guidance_embedding
from .optimize import step_cache
from .sampling import check_sampler, make_plan, native, run_sampler, sampler_eta
from .sampling.noise import Generators, generators_for, randn
from .vae_tiling import decode_tiled

log = logging.getLogger(__name__)


@dataclass
class PipelineOutput:
    images: list  # PIL images (output_type="pil"), else an array / tensor
    latents: torch.Tensor  # final latents in the diffusion model's (scaled) space
    seed: int | list[int] | None = None  # the seed, or the per-image seeds


class NonFiniteError(RuntimeError):
    """NaN or inf appeared during generation."""


def _check_finite(x: torch.Tensor, stage: str) -> None:
    if not torch.isfinite(x).all():
        raise NonFiniteError(f"NaN or inf in the {stage}; this happens when a reduced precision overflows — "
                             f"run the autoencoder (or the whole model) in float32 (dtype=torch.float32)")


class Pipeline:
    def __init__(self, model: LoadedModel, backend="torch", device="cpu", dtype: torch.dtype | None = None,
                 scheduler: str = "cpp", prompt_syntax: str = "a1111", clip_skip: int | None = None,
                 embedding_dirs=None, lora_dirs=None, **backend_options):
        """`prompt_syntax` "a1111" ((x) [x] (x:1.5) BREAK) or "plain"; `clip_skip` the default for every
        call (None: the model's own layer; A1111's meaning: 2 = one layer earlier); `embedding_dirs`
        folders of textual-inversion files, each called up in prompts by its file stem."""
        if scheduler not in ("cpp", "python"):
            raise ValueError(f"scheduler must be 'cpp' (the native loop) or 'python', got {scheduler!r}")
        self.model = model
        self.config = model.config
        self.scheduler = scheduler
        self.vae_tiling: tuple[int, int] | None = None  # (tile, overlap) once enable_vae_tiling() is called
        self._graphs = None  # CUDA-graph loop, made on first use on a CUDA device
        self.backend = (make_backend(backend, model, device, dtype, **backend_options) if isinstance(backend, str)
                        else backend)
        self.prompts = None  # prompt text -> context (text-conditioned models)
        if model.tokenizer is not None:  # the layout model's transformer reads box tokens, not prompts
            self.prompts = PromptEncoder(model, self.backend, prompt_syntax, clip_skip, embedding_dirs,
                                         on_change=self._text_encoder_changed)
        elif embedding_dirs or clip_skip is not None:
            raise ValueError(f"{model.config.name} has no text encoder: clip_skip and embedding_dirs do not apply")
        # LoRA / LyCORIS files merged into the weights; `lora_dirs`: folders that <lora:NAME:w> prompt tags read
        self.adapters = LoraManager(model, self.backend, lora_dirs, on_change=self._weights_changed)
        if hasattr(self.backend, "base_graphs"):  # graph backends keep the original UNet graph across LoRAs
            self.backend.base_graphs.original_weights = self.adapters.original_weights
        self.control = ControlNets(model, self.backend)  # ControlNets whose residuals join every UNet call

    @classmethod
    def from_pretrained(cls, path=None, config=None, backend: str = "torch", dtype: torch.dtype | None = None,
                        device: str = "cpu", use_ema: bool = True, scheduler: str = "cpp", prompt_syntax: str = "a1111",
                        clip_skip: int | None = None, embedding_dirs=None, lora_dirs=None, tokenizer=None,
                        **backend_options) -> "Pipeline":
        """A pipeline over anything load_checkpoint reads (single file or diffusers folder); with no path,
        the embedded default model (64x64 shapes, e.g. "a red circle on a blue background").
        `dtype` None: the backend's own default (torch: float32; openvino: bf16 where the CPU has it);
        "int8" (openvino only): NNCF-quantized graphs (ldm_engine.optimize.int8).
        `tokenizer`: tokenizer files other than the model's own (load_checkpoint), e.g. the LDM text-to-image
        model's BERT vocab.txt.
        `backend_options` go to the backend (torch: kernels="triton" swaps in the Triton kernels;
        onnxruntime/openvino: onnx_dir, cache_dir, threads; openvino: reshape)."""
        path = default_model() if path is None else path
        check_int8(backend, dtype)  # before loading anything
        weights_dtype = dtype if backend == "torch" and dtype is not None else torch.float32  # graphs export from fp32
        return cls(load_checkpoint(path, config=config, use_ema=use_ema, dtype=weights_dtype, tokenizer=tokenizer),
                   backend, device, dtype,
                   scheduler, prompt_syntax, clip_skip, embedding_dirs, lora_dirs=lora_dirs, **backend_options)

    # ---- conditioning ----------------------------------------------------------------------------

    def _prompt_encoder(self) -> PromptEncoder:
        if self.prompts is None:
            raise ValueError(f"{self.config.name} has no text encoder: it takes no prompts or embeddings")
        return self.prompts

    def encode_prompt(self, prompt: str | list[str], negative_prompt: str | list[str] | None = None,
                      clip_skip: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(context, uncond_context), each (B, 77·k, C): the prompts in the pipeline's syntax, long ones in
        k chunks, the negatives (default: the empty prompt) padded to the same length. They can be
        edited and passed back as prompt_embeds / negative_prompt_embeds."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        return self._prompt_encoder().conditioning(prompts, negative_prompt, True, clip_skip,
                                                   context_dim=self.config.unet.context_dim)

    def load_textual_inversion(self, path, token: str | None = None) -> str:
        """Load a textual-inversion embedding (A1111 .pt/.safetensors, diffusers learned_embeds); returns the
        trigger that calls it up in prompts: `token`, else the file stem (A1111 files) or its key (diffusers)."""
        return self._prompt_encoder().embeddings.load(path, token)

    def unload_textual_inversions(self) -> None:
        """Remove every embedding: the text encoder's token table is the original tensor again."""
        self._prompt_encoder().embeddings.unload_all()

    @property
    def textual_inversions(self) -> dict:
        """trigger -> Embedding (vectors, file, hash) for every embedding loaded."""
        return dict(self.prompts.embeddings.loaded) if self.prompts is not None else {}

    # ---- LoRA / LyCORIS ---------------------------------------------------------------------------

    def load_lora(self, path, scale: float = 1.0, text_encoder_scale: float | None = None, strict: bool = True) -> str:
        """Merge a LoRA / LoCon / LoHa / LoKr / DoRA file (kohya, A1111, LyCORIS, PEFT or diffusers keys) into
        the weights: UNet updates times `scale`, text-encoder ones times `text_encoder_scale` (default:
        `scale`). Returns its name (the file stem, made unique). `strict`: refuse a file of which fewer than
        half the modules fit this model (a LoRA for another model); False applies whatever fits."""
        return self.adapters.load(path, scale, text_encoder_scale, strict)

    def set_lora_scale(self, name: str, scale: float, text_encoder_scale: float | None = None) -> None:
        """New multipliers for a loaded LoRA: its weights are recomputed from the originals."""
        self.adapters.set_scale(name, scale, text_encoder_scale)

    def unload_lora(self, name: str) -> None:
        self.adapters.unload(name)

    def unload_loras(self) -> None:
        """Every LoRA off: the touched weights are their originals again, bit for bit."""
        self.adapters.unload()

    @property
    def loras(self) -> list[dict]:
        """The loaded LoRAs: name, path, scales, hash (A1111's short sha256), modules matched of the file's."""
        return self.adapters.loras

    # ---- ControlNet -------------------------------------------------------------------------------

    def load_controlnet(self, path) -> str:
        """Load a ControlNet (original .safetensors/.pth/.ckpt, `control_model.*` or bare keys, or a diffusers
        ControlNetModel folder) made for this model's family; returns its name (the file stem, made unique).
        Every loaded ControlNet takes part in each call, in load order, with its own control_image."""
        return self.control.load(path)

    def unload_controlnets(self) -> None:
        self.control.unload()

    @property
    def controlnets(self) -> list[str]:
        """The names of the loaded ControlNets, in load order."""
        return [c.name for c in self.control.loaded]

    def _weights_changed(self, components: list[str]) -> None:
        for component in components:
            if hasattr(self.backend, "reload"):
                self.backend.reload(component)
        self._graphs = None  # a captured CUDA graph may hold engine weights that were refitted

    def _text_encoder_changed(self) -> None:
        if hasattr(self.backend, "reload"):  # graph backends re-resolve their text encoder graph
            self.backend.reload("text_encoder")

    def _check_cache(self, cache, control, tile_spec) -> None:
        """Refuse the step cache where it cannot run, before any work."""
        if control is not None:
            raise ValueError("cache_interval with ControlNets is not supported: the ControlNet residuals feed the "
                             "deep blocks a shallow step skips; unload the ControlNets or leave cache_interval unset")
        if tile_spec is not None:
            raise ValueError("cache_interval with tile= is not supported (each patch would need its own cached "
                             "feature); use tile=False or leave cache_interval unset")
        if not hasattr(self.backend, "denoise_cached"):
            raise ValueError(f"the {self.backend.name} backend has no step cache; use backend='torch', "
                             "'onnxruntime' or 'openvino', or leave cache_interval unset")

    def _check_args(self, height, width, steps, strength, guidance_scale, sampler, image, mask_image, depth_map=None,
                    label_map=None, masked_content="original"):
        guidance_scale = min(guidance_scale) if isinstance(guidance_scale, (list, tuple)) else guidance_scale
        cfg = self.config
        # the latent side must survive the UNet's downsamplings; an upscaler's latent is the input image
        f = ((1 if cfg.task in ("upscale", "superres") else cfg.vae.downsampling_factor)
             * 2 ** (len(cfg.unet.channel_mult) - 1))
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
        concat_task = cfg.task in ("inpaint", "superres", "semantic")  # these check their own inputs below
        if mask_image is not None and cfg.conditioning == "none" and not concat_task:
            raise ValueError(f"{cfg.name} is an unconditional model and cannot inpaint; use an SD or inpainting model")
        if cfg.task == "inpaint" and mask_image is None:
            raise ValueError(f"{cfg.name} is an inpainting model: pass image and mask_image")
        if cfg.task == "upscale" and image is None:
            raise ValueError(f"{cfg.name} is an upscaler: pass the low-resolution image")
        depth.check_args(cfg, depth_map, mask_image)
        if cfg.task == "superres":  # the models conditioned by concatenation (ldm_engine.conditioning)
            superres.check_args(cfg, image, mask_image, label_map)
        elif cfg.task == "semantic":
            semantic.check_args(cfg, image, mask_image, label_map)
        elif cfg.task == "inpaint" and cfg.unet.in_channels == 7:
            inpaint_big.check_args(cfg, image, mask_image, label_map, masked_content)
        elif label_map is not None:
            raise ValueError(f"{cfg.name} takes no label_map (semantic synthesis models do)")

    def _graph_loop_run(self, sampler, raw_model, inputs, start, prediction, guided, guidance, eta, generator):
        """CUDA: the captured graph reads this call's inputs from device buffers of its own."""
        from .sampling.cuda_graph import CudaGraphLoop

        if self._graphs is None:
            self._graphs = CudaGraphLoop()
        dev = self.backend.device
        inputs = {k: None if v is None else v.to(dev) for k, v in inputs.items()}
        return self._graphs.run(sampler, raw_model, start.x.to(dev), start.plan, prediction, guided, guidance, eta,
                                generator, inputs).cpu()

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

    @restores_prompt_loras  # LoRAs loaded by this call's prompt tags are unloaded when it ends
    def __call__(self, prompt: str | list[str] | None = None, negative_prompt: str | list[str] | None = None,
                 height: int | None = None, width: int | None = None, num_inference_steps: int = 50,
                 guidance_scale: float | list[float] | None = None, sampler: str | None = None,
                 eta: float | None = None,
                 seed: int | list[int] | None = None, generator: Generators = None, latents: torch.Tensor | None = None,
                 num_images_per_prompt: int = 1, image=None, mask_image=None, strength: float | None = None,
                 noise_level: int = 20, class_label: int | list[int] | None = None, output_type: str = "pil",
                 progress: bool = True, callback=None, clip_skip: int | None = None,
                 prompt_embeds: torch.Tensor | None = None,
                 negative_prompt_embeds: torch.Tensor | None = None, control_image=None,
                 controlnet_conditioning_scale: float | list[float] = 1.0,
                 control_guidance_start: float | list[float] = 0.0, control_guidance_end: float | list[float] = 1.0,
                 guess_mode: bool = False, progress_callback=None, masked_content: str = "original",
                 depth_map=None, label_map=None, tile=False, layout=None, class_names=None,
                 cache_interval: int | None = None, cache_branch: int = 0,
                 cache_schedule: str = "uniform") -> PipelineOutput:
        """`clip_skip` overrides the pipeline's for this call; `prompt_embeds` / `negative_prompt_embeds`
        (B, 77·k, C), e.g. from encode_prompt, stand in for prompt / negative_prompt.
        `control_image`: one image per loaded ControlNet, RGB in [0, 1] at the output size (others are
        stretched: see ldm_engine.control.hint); the scale, start and end (fractions of the steps) are one
        value or one per ControlNet; `guess_mode`: the ControlNets see only the conditional CFG half.
        `seed` / `generator`: one for the whole batch, or a list with one per image — each image then gets the
        noise it would get alone (sampling.noise); `guidance_scale`: one value or one per image (None: the
        model's default, config.guidance_scale: 7.5, or 1.0 = no guidance for the LDM BERT models, as diffusers).
        `progress_callback(done, total)` runs after every denoising step on every loop (an exception it raises
        stops the run); `masked_content` (inpainting): what the masked area starts from — "original",
        "fill" (colours of its surroundings), "latent_noise" or "latent_nothing" (A1111's inpainting_fill).
        `depth_map` (depth-to-image models, required): (H, W) array / tensor or depth image, larger = nearer,
        one for all images or one per image; resized to the latent size and normalised to [-1, 1] (see
        ldm_engine.conditioning.depth). With `image` it is image-to-image at `strength` (default 0.8); without,
        sampling starts from pure noise at height x width and the depth map alone gives the structure.
        `label_map` (semantic synthesis models, required): class ids at the output size — a single-channel
        image or its path (integer PNG), a (H, W) integer array, or a one-hot (H, W, classes) array; it sets
        height and width (see ldm_engine.conditioning.semantic).
        `tile` (models conditioned by concatenation: LDM super-resolution, semantic synthesis, the big LDM
        inpainting model): False (default) samples convolutionally, the whole latent in each UNet call, as
        diffusers' LDMSuperResolutionPipeline does; True samples in overlapping patches of 128 latent pixels
        at stride 64 and decodes in the same patches, as the original's split_input_params; (side, stride) in
        latent pixels chooses the patches (see ldm_engine.conditioning.patches).
        `layout` (layout-to-image models, required): [(class, (x0, y0, x1, y1)), ...] boxes as fractions of
        the image in [0, 1], at most 30 objects, or a list of such layouts (one per image); the class is a
        number, or a name found in `class_names` (a list, or a file with one name per line; the checkpoint
        stores none). See ldm_engine.conditioning.layout for the tokens; these models run without guidance.
        `cache_interval` (None: off): DeepCache step-feature caching — every cache_interval-th step runs the
        whole UNet, the steps between only its shallow part down to `cache_branch` (0: shallowest and
        fastest), reusing the deep feature; `cache_schedule` "uniform" or "non-uniform" (denser full steps
        around step 15). See ldm_engine.optimize.step_cache."""
        cfg = self.config
        guidance_scale = cfg.guidance_scale if guidance_scale is None else guidance_scale
        sampler = sampler or cfg.default_sampler  # a diffusers folder's own scheduler, as diffusers runs it
        label_ids = None  # semantic synthesis: the label map sets the output size
        if label_map is not None and cfg.task == "semantic":
            label_ids = semantic.read_label_map(label_map, cfg.spatial_rescaler.in_channels)
            height, width = semantic.output_size(label_ids, height, width, cfg.vae.downsampling_factor
                                                 * 2 ** (len(cfg.unet.channel_mult) - 1))
        if image is not None and (height is None or width is None):
            probe = to_tensor(image)
            height, width = height or probe.shape[-2], width or probe.shape[-1]
        height, width = height or cfg.image_size, width or cfg.image_size
        # eta None: the sampler's own (DDIM 0, TCD's gamma 0.3); strength None: 1.0 for 9-channel inpainting, else 0.8
        strength = tasks.default_strength(cfg, mask_image) if strength is None else strength
        self._check_args(height, width, num_inference_steps, strength, guidance_scale, sampler, image, mask_image,
                         depth_map=depth_map, label_map=label_map, masked_content=masked_content)
        check_layout(cfg, layout, class_names)
        tile_spec = patches.resolve_tile(tile, cfg)  # None: convolutional sampling
        control = self.control.prepare(control_image, controlnet_conditioning_scale, control_guidance_start,
                                       control_guidance_end, guess_mode, height, width)
        cache = step_cache.CacheSettings.checked(cache_interval, cache_branch, cache_schedule, cfg.unet)
        if cache is not None:
            self._check_cache(cache, control, tile_spec)
        eta = sampler_eta(sampler, eta)
        plan = make_plan(sampler, num_inference_steps, cfg.schedule)  # refuses bad step counts before any work
        if generator is None:
            seed = int(torch.randint(0, 2 ** 31 - 1, ()).item()) if seed is None else seed
            generator = (generators_for(seed) if isinstance(seed, (list, tuple))
                         else torch.Generator("cpu").manual_seed(seed))

        # conditioning: computed once per call, never per step
        # classifier-free guidance needs a learned "empty" condition: text models have the empty prompt
        # an LCM-distilled UNet has the guidance built in: one call per step at batch B, w as an embedding
        distilled = cfg.unet.time_cond_proj_dim is not None
        scales = [float(g) for g in guidance_scale] if isinstance(guidance_scale, (list, tuple)) else None
        guided = (any(g != 1.0 for g in scales) if scales else guidance_scale != 1.0) and cfg.conditioning == "text" \
            and not distilled
        if distilled and (negative_prompt or negative_prompt_embeds is not None):
            raise ValueError(f"{cfg.name} is an LCM-distilled model: its guidance (w = guidance_scale - 1) is built "
                             "into the UNet, which takes no negative prompt; leave negative_prompt unset")
        extra, context, uncond = {}, None, None
        if cfg.conditioning == "text":
            prompts = ([prompt] if isinstance(prompt, str) else list(prompt) if prompt is not None
                       else None if prompt_embeds is not None else [""])
            if prompts is not None:  # <lora:NAME:w> tags: applied for this call, removed from the text
                prompts = self.adapters.apply_prompt_tags(prompts)
            context, uncond = self._prompt_encoder().conditioning(prompts, negative_prompt, guided, clip_skip, prompt_embeds,
                                                                  negative_prompt_embeds, cfg.unet.context_dim)
            batch = context.shape[0]
        elif prompt_embeds is not None or negative_prompt_embeds is not None or clip_skip is not None:
            raise ValueError(f"{cfg.name} is not text-conditioned: prompt_embeds and clip_skip do not apply")
        elif cfg.conditioning == "class":
            if class_label is None:
                raise ValueError(f"{cfg.name} is class-conditional: pass class_label (0..{cfg.num_classes - 1})")
            labels = torch.tensor([class_label] if isinstance(class_label, int) else list(class_label))
            if labels.min() < 0 or labels.max() >= cfg.num_classes:
                raise ValueError(f"class_label must be in [0, {cfg.num_classes - 1}], got {labels.tolist()}")
            context = self.backend.embed_class(labels)
            batch = len(labels)
        elif cfg.conditioning == "layout":  # bounding-box tokens through the BERT transformer, once per call
            if prompt:
                raise ValueError(f"{cfg.name} is a layout-to-image model: it takes layout=, not a prompt")
            context = layout_context(self.backend, layout, self.model.text_encoder.config, class_names)
            batch = context.shape[0]
        else:
            if prompt:
                raise ValueError(f"{cfg.name} is unconditional: it takes no prompt")
            batch = 1
        n = num_images_per_prompt
        if context is not None:
            context = context.repeat_interleave(n, dim=0)
            uncond = uncond.repeat_interleave(n, dim=0) if uncond is not None else None
        batch *= n
        if isinstance(generator, (list, tuple)) and len(generator) != batch:
            raise ValueError(f"{len(generator)} seeds/generators for {batch} images; give one per image")
        if scales is not None and len(scales) != batch:
            raise ValueError(f"{len(scales)} guidance scales for {batch} images; give one value or one per image")
        # one guidance value for all, else a (B, 1, 1, 1) column broadcast over each image's output
        guidance = scales[0] if scales and len(set(scales)) == 1 else (
            torch.tensor(scales).view(-1, 1, 1, 1) if scales else float(guidance_scale))

        f = cfg.vae.downsampling_factor
        if cfg.task in ("upscale", "superres"):  # the latent is the low-res image's size; the output f times larger
            height, width = height * f, width * f
        shape = (batch, cfg.vae.embed_dim, height // f, width // f)
        scale = cfg.scale_factor

        def noise_fn() -> torch.Tensor:
            if latents is not None:
                if tuple(latents.shape) != shape:
                    raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
                return latents.float()
            return randn(shape, generator)

        if cfg.task == "upscale":
            start = tasks.upscale(self.backend, plan, image, noise_level, cfg, shape, generator, noise_fn)
        elif cfg.task == "superres":
            start = superres.start(plan, image, shape, noise_fn)
        elif cfg.task == "semantic":
            start = semantic.start(self.model.cond_stage, plan, label_ids, shape, noise_fn)
        elif cfg.task == "inpaint" and cfg.unet.in_channels == 7:
            start = inpaint_big.start(self.backend, plan, image, mask_image, num_inference_steps, strength, scale,
                                      shape, noise_fn)
        elif cfg.task == "depth":
            start = depth.depth2img(self.backend, plan, image, depth_map, num_inference_steps, strength, scale, shape,
                                    generator, noise_fn)
        elif mask_image is not None:
            start = tasks.inpaint(self.backend, plan, image, mask_image, num_inference_steps, strength, scale, shape,
                                  generator, noise_fn, concat_mask=cfg.unet.in_channels == 9,
                                  masked_content=masked_content)
        elif image is not None:
            start = tasks.img2img(self.backend, plan, image, num_inference_steps, strength, scale, shape,
                                  generator, noise_fn)
        else:
            start = tasks.txt2img(plan, noise_fn())
        if start.class_labels is not None:
            extra["class_labels"] = torch.cat([start.class_labels] * (2 if guided else 1)).to(self.backend.device)
        if distilled:
            w = (torch.tensor(scales) if scales else torch.full((batch,), float(guidance_scale))) - 1.0
            extra["timestep_cond"] = guidance_embedding(w, cfg.unet.time_cond_proj_dim).to(self.backend.device)

        cfg_context = torch.cat([uncond, context]) if guided else context  # built once, not per step
        if control is not None:  # the ControlNets' residuals for each denoiser call
            control = control.bind(start.plan.timesteps, cfg_context, guided, batch, n)

        # the tensors every denoiser call reads; the CUDA-graph loop swaps in copies it owns
        call_inputs = {"context": cfg_context, "concat": start.concat, **extra}
        denoise = patches.patchwise(self.backend.denoise, *tile_spec) if tile_spec else self.backend.denoise
        if cache is not None:  # DeepCache: full or shallow UNet by step, the deep feature kept in between
            denoise = step_cache.CachedDenoise(self.backend, cache, start.plan.timesteps)

        def raw_model(x_in: torch.Tensor, t, inputs: dict = call_inputs) -> torch.Tensor:
            """The UNet (with the ControlNets' residuals) on the CFG batch: [uncond; cond] outputs when guided."""
            step_extra = {k: v for k, v in inputs.items() if k not in ("context", "concat")}
            if control is not None:
                step_extra["control"] = control(x_in, t)
            if inputs["concat"] is not None:
                x_in = torch.cat([x_in, inputs["concat"]], dim=1)
            return denoise(torch.cat([x_in, x_in]) if guided else x_in, t, inputs["context"], step_extra)

        def model(x_in: torch.Tensor, t) -> torch.Tensor:
            out = raw_model(x_in, t)
            if not guided:
                return out
            out_u, out_c = out.chunk(2)
            return out_u + guidance * (out_c - out_u)

        def on_step(info):
            if start.callback is not None:
                info["x"] = start.callback(info)
            if callback is not None:
                callback(info)
            if progress_callback is not None:
                progress_callback(info["i"] + 1, len(start.plan.timesteps))
            return info["x"]

        # The native loop runs whole trajectories; per-step hooks (latent blending, callbacks) need Python.
        native_ok = (self.scheduler == "cpp" and native.available(sampler) and start.callback is None
                     and callback is None and cfg.prediction_type in ("eps", "v"))
        per_image = isinstance(guidance, torch.Tensor)
        if native_ok and per_image:  # the native loop's fused CFG takes one scale: combine here instead
            native_model, native_guided = model, False
        else:
            native_model, native_guided = raw_model, guided
        if (native_ok and control is None and cache is None and self.backend.device.type == "cuda" and not per_image
                and progress_callback is None and getattr(self.backend, "graph_capturable", False)):
            x = self._graph_loop_run(sampler, raw_model, call_inputs, start, cfg.prediction_type, guided, guidance,
                                     eta, generator)
        elif native_ok:
            x = native.run_native(sampler, native_model, start.x, start.plan, cfg.prediction_type, native_guided,
                                  1.0 if per_image else guidance, eta, generator, disable=not progress,
                                  progress_callback=progress_callback)
        else:
            x = run_sampler(sampler, model, start.x, start.plan, cfg.prediction_type, eta=eta, generator=generator,
                            callback=on_step, disable=not progress)
        _check_finite(x, "latents after sampling")
        if output_type == "latent":
            return PipelineOutput(x, x, seed)
        images = (patches.decode_patches(self.backend.decode, x / cfg.scale_factor, *tile_spec,
                                         cfg.vae.downsampling_factor) if tile_spec else self.decode(x))
        if start.finish is not None:  # e.g. the LDM inpainting model's composite with the input image
            images = start.finish(images)
        _check_finite(images, "decoded image")
        out = {"pil": to_pil, "np": to_numpy, "pt": lambda t: (t / 2 + 0.5).clamp(0, 1)}
        if output_type not in out:
            raise ValueError(f"output_type must be one of pil, np, pt, latent; got {output_type!r}")
        return PipelineOutput(out[output_type](images), x, seed)
