"""Request and response bodies of the serving APIs, as pydantic models: one place to read every field and
its default.

AUTOMATIC1111 (`/sdapi/v1/*`): field names and defaults are those of A1111's API models, which it derives
from `StableDiffusionProcessingTxt2Img` / `...Img2Img` (modules/processing.py) plus the API's own extras
(`sampler_index` "Euler", `send_images`, `alwayson_scripts`, ...). Every field is optional, as there, and
unknown fields are ignored, so bodies written for A1111 (or for its extensions) parse. Which fields are
used, ignored or refused is decided in `convert`.

OpenAI (`/v1/images/generations`, `/v1/images/edits`): the Images API's fields; `quality`, `style`,
`background`, ... are ignored. A few optional extras (negative_prompt, seed, steps, cfg_scale, sampler_name,
scheduler) let clients that can add body fields steer the sampler; OpenAI's clients send none of them.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

_IGNORE = ConfigDict(extra="ignore", protected_namespaces=())


# ---- AUTOMATIC1111 -----------------------------------------------------------------------------------

class A1111Request(BaseModel):
    """The fields txt2img and img2img share (A1111's StableDiffusionProcessing + API extras)."""
    model_config = _IGNORE

    prompt: str | None = ""
    negative_prompt: str | None = ""
    styles: list[str] | None = None  # prompt styles: none are defined here, so (as A1111 does for unknown ones) ignored
    seed: int | None = -1  # -1: a random seed; image i of the request gets seed + i
    subseed: int | None = -1
    subseed_strength: float | None = 0
    seed_resize_from_h: int | None = -1
    seed_resize_from_w: int | None = -1
    sampler_name: str | None = None  # None: sampler_index
    sampler_index: str | None = "Euler"  # A1111's API default sampler
    scheduler: str | None = None  # None / "Automatic": the sampler's own
    batch_size: int | None = 1
    n_iter: int | None = 1
    steps: int | None = 50
    cfg_scale: float | None = 7.0
    width: int | None = 512
    height: int | None = 512
    restore_faces: bool | None = None
    tiling: bool | None = None
    do_not_save_samples: bool | None = False
    do_not_save_grid: bool | None = False
    eta: float | None = None  # DDIM's eta / TCD's gamma; None: the sampler's own
    denoising_strength: float | None = 0.75
    s_min_uncond: float | None = None
    s_churn: float | None = None
    s_tmax: float | None = None
    s_tmin: float | None = None
    s_noise: float | None = None
    # sd_model_checkpoint picks the model (a served name or its "name [hash]" title);
    # CLIP_stop_at_last_layers is the clip skip (1 = the text encoder's last layer)
    override_settings: dict[str, Any] | None = None
    override_settings_restore_afterwards: bool | None = True
    refiner_checkpoint: str | None = None
    refiner_switch_at: float | None = None
    disable_extra_networks: bool | None = False
    comments: dict | None = None
    script_name: str | None = None
    script_args: list | None = Field(default_factory=list)
    send_images: bool | None = True
    save_images: bool | None = False
    alwayson_scripts: dict | None = Field(default_factory=dict)
    force_task_id: str | None = None
    infotext: str | None = None


class Txt2ImgRequest(A1111Request):
    """POST /sdapi/v1/txt2img."""
    enable_hr: bool | None = False
    firstphase_width: int | None = 0
    firstphase_height: int | None = 0
    hr_scale: float | None = 2.0
    hr_upscaler: str | None = None
    hr_second_pass_steps: int | None = 0
    hr_resize_x: int | None = 0
    hr_resize_y: int | None = 0
    hr_checkpoint_name: str | None = None
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str | None = ""
    hr_negative_prompt: str | None = ""


class Img2ImgRequest(A1111Request):
    """POST /sdapi/v1/img2img: img2img, or inpainting when `mask` is given."""
    init_images: list[str] | None = None  # base64 images or data URLs; one is used
    resize_mode: int | None = 0  # 0: just resize (the only mode run here)
    image_cfg_scale: float | None = None  # InstructPix2Pix only; ignored
    mask: str | None = None  # base64; white (or opaque, for an RGBA mask) = repaint
    mask_blur_x: int | None = 4
    mask_blur_y: int | None = 4
    mask_blur: int | None = None  # when given, sets both mask_blur_x and mask_blur_y (A1111's setter)
    inpainting_fill: int | None = 0  # 0 fill, 1 original, 2 latent noise, 3 latent nothing
    inpaint_full_res: bool | None = True  # "only masked" crop; the whole picture is inpainted here
    inpaint_full_res_padding: int | None = 0
    inpainting_mask_invert: int | None = 0  # 1: repaint what the mask leaves black
    initial_noise_multiplier: float | None = None
    latent_mask: str | None = None
    include_init_images: bool | None = False


class JobRequest(Img2ImgRequest, Txt2ImgRequest):
    """POST /v1/jobs: an A1111 txt2img or img2img body (the fields of both) plus `kind` (default: img2img
    when init_images are given, else txt2img)."""
    kind: Literal["txt2img", "img2img"] | None = None

    @model_validator(mode="after")
    def _kind(self) -> JobRequest:
        if self.kind is None:
            self.kind = "img2img" if self.init_images else "txt2img"
        elif self.kind == "txt2img" and self.init_images:
            raise ValueError("kind 'txt2img' takes no init_images; send kind 'img2img' to start from an image")
        return self


class Txt2ImgResponse(BaseModel):
    """txt2img / img2img answer: base64 PNGs, the request's parameters, and `info` (a JSON string)."""
    images: list[str] | None = None
    parameters: dict
    info: str


Img2ImgResponse = Txt2ImgResponse


class OptionsRequest(BaseModel):
    """POST /sdapi/v1/options: any of A1111's settings; sd_model_checkpoint switches the default model."""
    model_config = ConfigDict(extra="allow")
    sd_model_checkpoint: str | None = None
    CLIP_stop_at_last_layers: int | None = None


class OptionsResponse(BaseModel):
    """GET /sdapi/v1/options: the settings clients read (others may follow)."""
    model_config = ConfigDict(extra="allow")
    sd_model_checkpoint: str | None = None  # the default model's "name [hash]" title
    sd_checkpoint_hash: str | None = None
    CLIP_stop_at_last_layers: int = 1
    samples_format: str = "png"
    eta_ddim: float = 0.0
    eta_ancestral: float = 1.0


class ProgressState(BaseModel):
    """A1111's `shared.state.dict()`."""
    skipped: bool = False
    interrupted: bool = False
    stopping_generation: bool = False
    job: str = ""
    job_count: int = 0
    job_timestamp: str = "0"
    job_no: int = 0
    sampling_step: int = 0
    sampling_steps: int = 0


class ProgressResponse(BaseModel):
    """GET /sdapi/v1/progress."""
    progress: float = 0.0  # 0..1
    eta_relative: float = 0.0  # seconds left
    state: ProgressState = Field(default_factory=ProgressState)
    current_image: str | None = None  # live previews are not made here
    textinfo: str | None = None


class SamplerItem(BaseModel):
    name: str
    aliases: list[str]
    options: dict[str, Any]


class SchedulerItem(BaseModel):
    name: str
    label: str
    aliases: list[str] | None = None
    default_rho: float | None = None
    need_inner_model: bool | None = None


class SDModelItem(BaseModel):
    model_config = ConfigDict(protected_namespaces=())
    title: str  # "name [hash]"
    model_name: str
    hash: str | None = None
    sha256: str | None = None
    filename: str
    config: str | None = None


# ---- OpenAI -------------------------------------------------------------------------------------------

class _OpenAIExtras(BaseModel):
    """Optional steering fields (not OpenAI's; `extra_body` in its clients). None: the server's defaults."""
    model_config = _IGNORE

    negative_prompt: str | None = None
    seed: int | None = None  # image i gets seed + i; None: a random seed per image
    steps: int | None = None
    cfg_scale: float | None = None
    sampler_name: str | None = None  # an A1111 sampler name (or ours)
    scheduler: str | None = None


class ImageGenerationRequest(_OpenAIExtras):
    """POST /v1/images/generations."""
    prompt: str
    model: str | None = None  # a served model's name; None: the default model
    n: int | None = Field(default=1, ge=1, le=10)
    size: str | None = None  # "WIDTHxHEIGHT"; None / "auto": the model's native size
    response_format: Literal["b64_json", "url"] | None = "b64_json"
    user: str | None = None


class ImageEditRequest(ImageGenerationRequest):
    """POST /v1/images/edits (multipart form fields; `image` and `mask` come as files)."""
    denoising_strength: float | None = None  # None: the Pipeline's default (1.0 for inpainting models)


class ImageData(BaseModel):
    b64_json: str | None = None
    url: str | None = None
    revised_prompt: str | None = None


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]


def openai_error(status: int, message: str, type: str | None = None, param: str | None = None,
                 code: str | None = None) -> dict:
    """OpenAI's error body: {"error": {"message", "type", "param", "code"}}; `type` defaults by status
    (5xx: server_error, 429: rate_limit_error, 401: authentication_error, else invalid_request_error)."""
    if type is None:
        type = ("server_error" if status >= 500 else "rate_limit_error" if status == 429
                else "authentication_error" if status == 401 else "invalid_request_error")
    return {"error": {"message": message, "type": type, "param": param, "code": code}}
