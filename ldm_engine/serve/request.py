"""The one request type every serving route turns its body into, and the result it gets back.

A1111's `/sdapi/v1/txt2img|img2img`, OpenAI's `/v1/images/*` and `/v1/jobs` all become a
`GenerationRequest`: the Pipeline's own argument names, one seed per image (A1111: `seed + i`), images
already decoded and checked. The model worker batches requests by `batch_key` and answers each with a
`GenerationResult`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

# A1111's `inpainting_fill`: what the masked area starts from (0 fill, 1 original, 2 latent noise, 3 latent nothing)
MASKED_CONTENT = ("fill", "original", "latent_noise", "latent_nothing")


@dataclass
class GenerationRequest:
    prompt: str = ""
    negative_prompt: str = ""
    seeds: list[int] = field(default_factory=lambda: [0])  # one per image; len(seeds) images
    steps: int = 50
    guidance_scale: float = 7.0
    sampler: str = "ddim"  # an ldm_engine sampler name (the routes map A1111's names onto ours)
    width: int | None = None  # None: the model's native size
    height: int | None = None
    model: str | None = None  # a served model's name; None: the server's default model
    image: object | None = None  # PIL RGB image: img2img / inpainting input
    mask: object | None = None  # PIL "L" image of the image's size, white = repaint (blur already applied)
    strength: float | None = None  # denoising strength; None: the Pipeline's default
    masked_content: str = "original"  # one of MASKED_CONTENT (inpainting only)
    eta: float | None = None
    clip_skip: int | None = None
    source: str = "a1111"  # which API asked: "a1111", "openai" or "jobs" (for error shapes and metrics)

    @property
    def n_images(self) -> int:
        return len(self.seeds)


@dataclass
class GenerationResult:
    images: list  # PIL images, one per seed
    seeds: list[int]
    infotexts: list[str]  # A1111 parameters text per image (also written into each PNG)
    model_name: str
    model_hash: str
    steps_done: int = 0
    extra: dict = field(default_factory=dict)
