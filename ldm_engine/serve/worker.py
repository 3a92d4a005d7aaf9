"""One served model, free of Ray: the Pipeline, which requests may share a UNet call, and a batched run
with per-request progress and cancellation.

Requests share a batch when they agree on everything the UNet call depends on as a whole (`batch_key`:
size, steps, sampler, eta, whether guidance is on, the context length); each keeps its own prompt
(encoded alone, before batching), seeds and guidance scale. With the torch backend the UNet is made
batch-invariant (ldm_engine.optimize.batch_invariant) and every image is decoded alone, so a request gives
the same pixels batched or alone. Requests with an input image or `<lora:>` prompt tags never share a
batch with other requests: their inputs or weights are their own.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..adapters.tags import extract_lora_tags
from .request import GenerationRequest, GenerationResult

log = logging.getLogger(__name__)


class Cancelled(Exception):
    """Every request of a batch was cancelled; the run stopped between two steps."""


@dataclass
class ModelSpec:
    """What one deployment serves. `path` None: the embedded default model."""
    path: str | None = None
    name: str | None = None  # the name clients pick it by; default: the file or folder name
    backend: str = "torch"
    dtype: str | None = None  # fp32 / bf16 / fp16; None: the backend's default
    lora_dirs: list[str] = field(default_factory=list)
    embedding_dirs: list[str] = field(default_factory=list)
    threads: int | None = None  # torch / runtime threads; None: all cores


@dataclass
class Job:
    """A request inside the worker: its encoded prompt, its batch key and its live progress."""
    id: str
    request: GenerationRequest
    key: tuple
    context: torch.Tensor | None = None  # (1, 77·k, C) or None when the prompt runs through the Pipeline itself
    uncond: torch.Tensor | None = None
    step: int = 0
    steps: int = 0
    started: float | None = None
    cancelled: bool = False

    def cancel(self) -> None:
        self.cancelled = True


def model_name_and_hash(path: Path) -> tuple[str, str]:
    from ..cli import model_hash

    return (path.stem if path.is_file() else path.name), model_hash(path)


class ModelWorker:
    def __init__(self, spec: ModelSpec):
        from .. import Pipeline
        from ..cli import _dtype
        from ..defaults import default_model

        # Ray sets OMP_NUM_THREADS to an actor's CPU reservation (1 for a fraction); compute on what was asked
        torch.set_num_threads(spec.threads or os.cpu_count() or 1)
        self.spec = spec
        self.path = Path(spec.path) if spec.path else default_model()
        self.pipe = Pipeline.from_pretrained(self.path, backend=spec.backend, dtype=_dtype(spec.dtype),
                                             embedding_dirs=spec.embedding_dirs or None,
                                             lora_dirs=spec.lora_dirs or None)
        file_name, self.hash = model_name_and_hash(self.path)
        self.name = spec.name or file_name
        self.embedded = spec.path is None
        self.batch_invariant = spec.backend == "torch"
        if self.batch_invariant:
            from ..optimize.batch_invariant import make_batch_invariant

            make_batch_invariant(self.pipe.model.unet)
        self.lock = threading.Lock()  # one run at a time on this model's weights

    # ---- what the routes show ---------------------------------------------------------------------

    def info(self) -> dict:
        cfg = self.pipe.config
        return {"name": self.name, "hash": self.hash, "path": str(self.path), "config": cfg.name,
                "size": cfg.image_size, "sampler": cfg.default_sampler, "backend": self.spec.backend,
                "text": cfg.conditioning == "text", "task": cfg.task,
                "loras": [str(d) for d in self.spec.lora_dirs], "embeddings": self.embeddings()}

    def embeddings(self) -> dict:
        """trigger -> {vectors, shape, hash}: the embeddings loaded and those in the embedding folders."""
        from ..prompts.textual_inversion import SUFFIXES, file_hash, read_embedding_file

        prompts = self.pipe.prompts
        if prompts is None:
            return {}
        found = {t: {"vectors": e.num_vectors, "shape": int(e.vectors.shape[1]), "hash": e.hash}
                 for t, e in prompts.embeddings.loaded.items()}
        for folder in prompts.embeddings.dirs:
            for path in sorted(folder.iterdir()):
                if path.suffix in SUFFIXES and path.stem not in found:
                    try:
                        _, vectors = read_embedding_file(path)
                    except (ValueError, OSError) as e:
                        log.warning("skipping embedding %s: %s", path, e)
                        continue
                    found[path.stem] = {"vectors": int(vectors.shape[0]), "shape": int(vectors.shape[1]),
                                        "hash": file_hash(path)}
        return found

    # ---- batching ---------------------------------------------------------------------------------

    def prepare(self, job_id: str, req: GenerationRequest) -> Job:
        """Check the request against this model and encode its prompt (alone, so batching cannot change it)."""
        cfg, pipe = self.pipe.config, self.pipe
        width, height = req.width or cfg.image_size, req.height or cfg.image_size
        guidance = float(req.guidance_scale)
        pipe._check_args(height, width, req.steps, 0.8 if req.strength is None else req.strength, guidance,
                         req.sampler, req.image, req.mask)
        if cfg.conditioning != "text" and req.prompt:
            raise ValueError(f"{cfg.name} is not text-conditioned: it takes no prompt")
        distilled = cfg.unet.time_cond_proj_dim is not None
        guided = cfg.conditioning == "text" and not distilled and guidance != 1.0
        job = Job(job_id, req, key=())
        _, tags = extract_lora_tags(req.prompt or "")
        solo = req.image is not None or bool(tags)
        length = None
        if cfg.conditioning == "text" and not solo:
            with self.lock, torch.no_grad():
                job.context, job.uncond = pipe.encode_prompt(req.prompt or "", req.negative_prompt or None,
                                                             req.clip_skip)
            length = job.context.shape[1]
        job.key = (width, height, req.steps, req.sampler, req.eta, guided, length, job_id if solo else None)
        return job

    def run_batch(self, jobs: list[Job], on_step=None) -> list:
        """Run jobs that share a batch key; one GenerationResult (or the exception it raised) per job.
        `on_step(jobs, done, total)` runs after every step; it may raise Cancelled to stop the batch."""
        start = time.perf_counter()
        for job in jobs:
            job.started, job.steps = start, job.request.steps

        def progress(done: int, total: int) -> None:
            for job in jobs:
                job.step, job.steps = done, total
            if on_step is not None:
                on_step(jobs, done, total)
            if all(job.cancelled for job in jobs):
                raise Cancelled(f"cancelled at step {done} of {total}")

        try:
            with self.lock, torch.no_grad():
                latents = self._sample(jobs, progress)
                return self._finish(jobs, latents)
        except Cancelled:
            raise
        except Exception as e:  # one request's bad input must not take the others down with it
            if len(jobs) == 1:
                return [e]
            log.warning("batch of %d failed (%s); running its requests one by one", len(jobs), e)
            out = []
            for job in jobs:
                try:
                    with self.lock, torch.no_grad():
                        out += self._finish([job], self._sample([job], progress))
                except Cancelled:
                    out.append(Cancelled("cancelled"))
                except Exception as one:
                    out.append(one)
            return out

    def _sample(self, jobs: list[Job], progress) -> torch.Tensor:
        first = jobs[0].request
        width, height, _, _, _, guided, _, _ = jobs[0].key
        seeds = [s for job in jobs for s in job.request.seeds]
        scales = [float(job.request.guidance_scale) for job in jobs for _ in job.request.seeds]
        common = dict(height=height, width=width, num_inference_steps=first.steps, sampler=first.sampler,
                      eta=first.eta, seed=seeds, guidance_scale=scales, output_type="latent", progress=False,
                      progress_callback=progress)
        if jobs[0].context is None:  # solo: an input image or LoRA tags, through the Pipeline's own path
            n = first.n_images
            args = dict(common, num_images_per_prompt=n, clip_skip=first.clip_skip)
            if self.pipe.config.conditioning == "text":
                args.update(prompt=first.prompt, negative_prompt=first.negative_prompt or None)
            if first.image is not None:
                args.update(image=first.image, mask_image=first.mask, strength=first.strength)
                if first.mask is not None:
                    args["masked_content"] = first.masked_content
            return self.pipe(**args).images
        if self.pipe.config.conditioning != "text":
            return self.pipe(**common).images
        context = torch.cat([job.context.repeat(job.request.n_images, 1, 1) for job in jobs])
        uncond = torch.cat([job.uncond.repeat(job.request.n_images, 1, 1) for job in jobs]) if guided else None
        return self.pipe(prompt_embeds=context, negative_prompt_embeds=uncond, **common).images

    def _finish(self, jobs: list[Job], latents: torch.Tensor) -> list[GenerationResult]:
        """Decode each image alone (the decoder is not batch-invariant), paste an inpainting input back outside
        its mask, and write each image's parameters."""
        from PIL import Image

        from ..images import to_pil
        from .convert import request_infotext

        out, i = [], 0
        for job in jobs:
            req, images, texts = job.request, [], []
            for seed in req.seeds:
                image = to_pil(self.pipe.decode(latents[i:i + 1]))[0]
                if req.mask is not None:  # as A1111 does: the picture outside the (blurred) mask is the input's
                    image = Image.composite(image, req.image.convert("RGB").resize(image.size), req.mask.resize(image.size))
                images.append(image)
                texts.append(request_infotext(req, seed, image.width, image.height, self.name, self.hash))
                i += 1
            out.append(GenerationResult(images, list(req.seeds), texts, self.name, self.hash, steps_done=job.step))
        return out

    def health(self) -> None:
        """A tiny generation: one step at a small size the model takes (what Ray's health check runs)."""
        cfg = self.pipe.config
        # twice the smallest size: the innermost feature map is 2x2, so a GroupNorm of one channel per group
        # still has more than one value to normalise
        f = 2 * (1 if cfg.task in ("upscale", "superres") else cfg.vae.downsampling_factor) * 2 ** (len(cfg.unet.channel_mult) - 1)
        args = dict(height=f, width=f, num_inference_steps=1, seed=0, output_type="latent", progress=False)
        if cfg.conditioning == "class":
            args["class_label"] = 0
        if cfg.task in ("inpaint", "upscale", "superres"):
            from PIL import Image

            args["image"] = Image.new("RGB", (f, f), (128, 128, 128))
            if cfg.task == "inpaint":
                args["mask_image"] = Image.new("L", (f, f), 255)
        elif cfg.task == "semantic":  # every pixel class 0
            args["label_map"] = np.zeros((f, f), dtype=np.int64)
        elif cfg.task == "depth":  # a left-to-right ramp (a constant map is refused)
            args["depth_map"] = np.tile(np.linspace(0.0, 1.0, f, dtype=np.float32), (f, 1))
        elif cfg.task == "layout":
            args["layout"] = [(0, (0.25, 0.25, 0.75, 0.75))]
        with self.lock, torch.no_grad():
            out = self.pipe(**args).images
        if not torch.isfinite(out).all():
            raise RuntimeError("the health check's one-step generation gave NaN or inf")
