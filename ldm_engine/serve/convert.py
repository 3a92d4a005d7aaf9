"""AUTOMATIC1111 / OpenAI request bodies -> GenerationRequest, and GenerationResult -> their answers.

Pure functions (no Ray, no model): every check a request can fail without running the model happens here,
so a bad request is refused with a RequestError (400; 404 for an unknown model) naming the field, the
offending value and the limit, before it reaches a worker.

A1111 semantics kept: seed -1 draws `random.randrange(4294967294)` and image i of batch_size * n_iter gets
seed + i; "sampler_name or sampler_index" (default "Euler") with `scheduler` (see samplers_a1111);
override_settings' sd_model_checkpoint picks the model and CLIP_stop_at_last_layers the clip skip; the
img2img mask is made binary, inverted and blurred as A1111 does; `info` is A1111's `Processed.js()`.
Not run here, hence refused when set: hires fix, face restoration, tiling, variation seeds, scripts,
refiners, resize modes other than 0. Ignored: prompt styles, inpaint_full_res (the whole picture is
inpainted), image_cfg_scale, and eta for samplers other than DDIM (its eta) and TCD (its gamma).
"""
from __future__ import annotations

import base64
import json
import math
import random
import re
import time
from collections.abc import Callable, Iterable, Mapping

from pydantic import BaseModel, ValidationError

from .. import __version__
from ..infotext import A1111_SAMPLER_NAMES, infotext
from .image_io import a1111_mask, alpha_mask, decode_image, flatten, has_alpha, png_base64, png_bytes
from .limits import RequestError, ServeLimits
from .request import MASKED_CONTENT, GenerationRequest, GenerationResult
from .samplers_a1111 import a1111_sampler, a1111_samplers, a1111_schedulers, infotext_sampler
from .schemas import (A1111Request, ImageEditRequest, ImageGenerationRequest, Img2ImgRequest, JobRequest,
                      Txt2ImgRequest)

__all__ = ["ServeLimits", "RequestError", "a1111_sampler", "a1111_samplers", "a1111_schedulers", "decode_image",
           "png_base64", "png_bytes", "parse_request", "resolve_model", "txt2img_request", "img2img_request",
           "job_request", "openai_generation_request", "openai_edit_request", "request_infotext", "a1111_response",
           "openai_response"]

RANDOM_SEEDS = 4294967294  # A1111's seed -1: random.randrange(4294967294)
MAX_SEED = 2 ** 64 - 1  # the largest seed torch.Generator.manual_seed takes
# A1111 fields whose features are not run here: the values that mean "off" (None always does)
_OFF = {"enable_hr": (False,), "restore_faces": (False,), "tiling": (False,), "subseed_strength": (0,),
        "script_name": ("",), "alwayson_scripts": ({},), "refiner_checkpoint": ("", "None", "none"),
        "s_churn": (0,), "s_noise": (1,), "s_min_uncond": (0,), "resize_mode": (0,), "latent_mask": ("",),
        "initial_noise_multiplier": (1,)}


def parse_request(model: type[BaseModel], data: Mapping) -> BaseModel:
    """`model` validated from `data`; a wrong type or value -> RequestError naming the field."""
    try:
        return model.model_validate(dict(data))
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or None
        raise RequestError(f"{where or 'body'}: {first['msg']}", where) from None


def random_seed() -> int:
    return random.randrange(RANDOM_SEEDS)


def request_seeds(seed: int | None, n: int, param: str = "seed") -> list[int]:
    """A1111's seeds: one per image, seed + i; seed -1 (or None) draws a random one first."""
    if seed is None or seed == -1:
        seed = random_seed()
    elif seed < 0 or seed + n - 1 > MAX_SEED:
        raise RequestError(f"{param} must be -1 (random) or in [0, {MAX_SEED - n + 1}] for {n} image(s), got {seed}",
                           param)
    return [seed + i for i in range(n)]


def resolve_model(requested: str | None, model_names: Iterable[str] | Mapping | None,
                  param: str = "model") -> str | None:
    """A served model's name from what the client sent: its name, A1111's "name [hash]" title, the name with
    a checkpoint extension, its hash (when `model_names` maps names to hashes or to info dicts with "hash")
    or any of these in other letter case. None / "": None (the server's default model); `model_names` None:
    unchecked. Not served -> RequestError 404 (code model_not_found; A1111's API answers 404 too)."""
    if not requested or model_names is None:
        return requested or None
    hashes = {}
    if isinstance(model_names, Mapping):
        hashes = {n: v.get("hash") if isinstance(v, Mapping) else v for n, v in model_names.items()}
    names = list(model_names)
    base = re.sub(r"\s*\[[0-9a-fA-F]+\]\s*$", "", requested).strip()
    stem = re.sub(r"\.(safetensors|ckpt|pt|pth|bin)$", "", base, flags=re.IGNORECASE)
    for candidate in (requested, base, stem):
        if candidate in names:
            return candidate
        for name in names:
            if name.lower() == candidate.lower() or (hashes.get(name) and hashes[name] == candidate):
                return name
    raise RequestError(f"model {requested!r} is not served here; served: {', '.join(names)}", param, status=404,
                       code="model_not_found")


def _check_range(value, low, high, param: str, limit: str | None = None, what: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or \
            not low <= value <= (math.inf if high is None else high):
        bound = f"[{low}, {high}]" if high is not None else f">= {low}"
        named = f" (this server's {limit})" if limit else ""
        raise RequestError(f"{param} must be {what}in {bound}{named}, got {value!r}", param)


def check_size(width, height, limits: ServeLimits, param_w: str = "width", param_h: str = "height") -> None:
    """Positive multiples of limits.size_multiple, at most limits.max_pixels pixels."""
    m = limits.size_multiple
    for param, v in ((param_w, width), (param_h, height)):
        if isinstance(v, bool) or not isinstance(v, int) or v < m or v % m:
            fix = f"; try {max(m, v // m * m)}" if isinstance(v, int) and v > 0 else ""
            raise RequestError(f"{param} must be a positive multiple of {m}, got {v!r}{fix}", param)
    if width * height > limits.max_pixels:
        raise RequestError(f"{width}x{height} is {width * height} pixels, over this server's limit of "
                           f"{limits.max_pixels} (max_pixels); ask for a smaller size", param_w, code="too_large")


def _check_text(text: str, limits: ServeLimits, param: str) -> str:
    text = text or ""
    if len(text) > limits.max_prompt_chars:
        raise RequestError(f"{param} is {len(text)} characters, over this server's limit of {limits.max_prompt_chars} "
                           "(max_prompt_chars)", param, code="too_large")
    return text


def _check_eta(sampler: str, eta: float | None) -> float | None:
    """eta for the samplers that take one (DDIM's eta, TCD's gamma), else None."""
    if eta is None or sampler not in ("ddim", "tcd"):
        return None
    _check_range(eta, 0.0, 1.0 if sampler == "tcd" else None, "eta")
    return float(eta)


def _common(body: A1111Request, limits: ServeLimits, model_names, source: str) -> dict:
    """The GenerationRequest fields txt2img and img2img share, checked."""
    for field, off in _OFF.items():
        value = getattr(body, field, None)
        if value is not None and value not in off:
            raise RequestError(f"{field}={value!r} is not supported by this server; leave it at {off[0]!r}", field,
                               code="unsupported")
    if (body.seed_resize_from_w or 0) > 0 or (body.seed_resize_from_h or 0) > 0:
        raise RequestError("seed_resize_from_w/h is not supported by this server; leave it at -1", "seed_resize_from_w",
                           code="unsupported")
    sampler = a1111_sampler(body.sampler_name or body.sampler_index, body.scheduler)
    steps = 50 if body.steps is None else body.steps
    _check_range(steps, 1, limits.max_steps, "steps", "max_steps", "an integer ")
    width, height = 512 if body.width is None else body.width, 512 if body.height is None else body.height
    check_size(width, height, limits)
    batch, n_iter = 1 if body.batch_size is None else body.batch_size, 1 if body.n_iter is None else body.n_iter
    _check_range(batch, 1, limits.max_images, "batch_size", "max_images")
    _check_range(n_iter, 1, limits.max_images, "n_iter", "max_images")
    if batch * n_iter > limits.max_images:
        raise RequestError(f"batch_size * n_iter = {batch} * {n_iter} = {batch * n_iter} images, over this server's "
                           f"limit of {limits.max_images} (max_images)", "n_iter", code="too_large")
    cfg = 7.0 if body.cfg_scale is None else body.cfg_scale
    _check_range(cfg, 0.0, None, "cfg_scale")
    settings = body.override_settings or {}
    clip_skip = settings.get("CLIP_stop_at_last_layers")
    if clip_skip is not None:
        _check_range(clip_skip, 1, None, "override_settings.CLIP_stop_at_last_layers", what="an integer ")
        if clip_skip != int(clip_skip):
            raise RequestError(f"override_settings.CLIP_stop_at_last_layers must be an integer, got {clip_skip!r}",
                               "override_settings.CLIP_stop_at_last_layers")
        clip_skip = int(clip_skip)
    return dict(prompt=_check_text(body.prompt, limits, "prompt"),
                negative_prompt=_check_text(body.negative_prompt, limits, "negative_prompt"),
                seeds=request_seeds(body.seed, batch * n_iter), steps=int(steps), guidance_scale=float(cfg),
                sampler=sampler, width=width, height=height, eta=_check_eta(sampler, body.eta), clip_skip=clip_skip,
                model=resolve_model(settings.get("sd_model_checkpoint"), model_names,
                                    "override_settings.sd_model_checkpoint"), source=source)


def txt2img_request(body: Txt2ImgRequest, limits: ServeLimits, model_names=None,
                    source: str = "a1111") -> GenerationRequest:
    """POST /sdapi/v1/txt2img -> GenerationRequest (see the module docstring for what is checked)."""
    return GenerationRequest(**_common(body, limits, model_names, source))


def img2img_request(body: Img2ImgRequest, limits: ServeLimits, model_names=None,
                    source: str = "a1111") -> GenerationRequest:
    """POST /sdapi/v1/img2img -> GenerationRequest: init_images[0] decoded (flattened onto white, as A1111
    does); with `mask`, inpainting: the mask must have the image's size, is made binary, inverted when
    inpainting_mask_invert, Gaussian-blurred by mask_blur (or mask_blur_x / _y), and inpainting_fill picks
    what the masked area starts from (MASKED_CONTENT). denoising_strength -> strength."""
    common = _common(body, limits, model_names, source)
    strength = 0.75 if body.denoising_strength is None else body.denoising_strength
    _check_range(strength, 0.0, 1.0, "denoising_strength")
    images = body.init_images or []
    if not images:
        raise RequestError("img2img needs init_images: a list with one base64 image", "init_images",
                           code="missing_required_parameter")
    if len(images) > 1:
        raise RequestError(f"init_images holds {len(images)} images; send one (every image of the batch starts "
                           "from it)", "init_images")
    mask, masked_content = None, "original"
    if body.mask:
        blur_x = body.mask_blur if body.mask_blur is not None else 4 if body.mask_blur_x is None else body.mask_blur_x
        blur_y = body.mask_blur if body.mask_blur is not None else 4 if body.mask_blur_y is None else body.mask_blur_y
        for param, blur in (("mask_blur_x", blur_x), ("mask_blur_y", blur_y)):
            _check_range(blur, 0, limits.max_mask_blur, "mask_blur" if body.mask_blur is not None else param,
                         "max_mask_blur", "an integer ")
        fill = 0 if body.inpainting_fill is None else body.inpainting_fill
        _check_range(fill, 0, len(MASKED_CONTENT) - 1, "inpainting_fill", what="an integer ")
        invert = 0 if body.inpainting_mask_invert is None else body.inpainting_mask_invert
        _check_range(invert, 0, 1, "inpainting_mask_invert", what="0 or 1, ")
        masked_content = MASKED_CONTENT[int(fill)]
    image = decode_image(images[0], limits, "init_images[0]")
    if body.mask:
        raw_mask = decode_image(body.mask, limits, "mask")
        if raw_mask.size != image.size:
            raise RequestError(f"mask is {raw_mask.width}x{raw_mask.height} but init_images[0] is "
                               f"{image.width}x{image.height}; send a mask of the image's size", "mask")
        mask = a1111_mask(raw_mask, bool(invert), int(blur_x), int(blur_y))
    return GenerationRequest(**common, image=flatten(image), mask=mask, strength=float(strength),
                             masked_content=masked_content)


def job_request(body: JobRequest, limits: ServeLimits, model_names=None) -> GenerationRequest:
    """POST /v1/jobs -> GenerationRequest by `kind` (source "jobs")."""
    if body.kind == "img2img":
        return img2img_request(body, limits, model_names, source="jobs")
    return txt2img_request(body, limits, model_names, source="jobs")


def parse_size(size: str | None, default_size, param: str = "size") -> tuple[int, int]:
    """OpenAI's size "WIDTHxHEIGHT" -> (width, height); None / "" / "auto": `default_size` ((w, h) or one side)."""
    if size is None or size.strip().lower() in ("", "auto"):
        return tuple(default_size) if isinstance(default_size, (tuple, list)) else (default_size, default_size)
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", size)
    if not match:
        raise RequestError(f"{param} must be WIDTHxHEIGHT such as 512x512, or auto; got {size!r}", param)
    return int(match[1]), int(match[2])


def _openai_common(body: ImageGenerationRequest, limits: ServeLimits, model_names, width: int,
                   height: int) -> dict:
    if not (body.prompt or "").strip():
        raise RequestError("prompt must not be empty", "prompt", code="missing_required_parameter")
    n = 1 if body.n is None else body.n
    _check_range(n, 1, min(10, limits.max_images), "n", "max_images")
    check_size(width, height, limits, "size", "size")
    out = dict(prompt=_check_text(body.prompt, limits, "prompt"), width=width, height=height, source="openai",
               model=resolve_model(body.model, model_names, "model"),
               seeds=[random_seed() for _ in range(n)] if body.seed is None else request_seeds(body.seed, n))
    if body.negative_prompt:
        out["negative_prompt"] = _check_text(body.negative_prompt, limits, "negative_prompt")
    if body.steps is not None:
        _check_range(body.steps, 1, limits.max_steps, "steps", "max_steps", "an integer ")
        out["steps"] = body.steps
    if body.cfg_scale is not None:
        _check_range(body.cfg_scale, 0.0, None, "cfg_scale")
        out["guidance_scale"] = float(body.cfg_scale)
    if body.sampler_name or body.scheduler:
        out["sampler"] = a1111_sampler(body.sampler_name, body.scheduler)
    return out


def openai_generation_request(body: ImageGenerationRequest, limits: ServeLimits, model_names=None,
                              default_size=512) -> GenerationRequest:
    """POST /v1/images/generations -> GenerationRequest: size "WxH" (None / "auto": `default_size`, the
    model's native size), n images with a random seed each (or seed + i with the `seed` extra)."""
    width, height = parse_size(body.size, default_size)
    return GenerationRequest(**_openai_common(body, limits, model_names, width, height))


def fit_size(image_size: tuple[int, int], default_size, multiple: int) -> tuple[int, int]:
    """The image's aspect ratio at the area of `default_size`, each side floored to `multiple`."""
    dw, dh = parse_size(None, default_size)
    scale = math.sqrt(dw * dh / (image_size[0] * image_size[1]))
    return tuple(max(multiple, int(side * scale) // multiple * multiple) for side in image_size)


def openai_edit_request(image_bytes: bytes, mask_bytes: bytes | None, fields: Mapping | ImageEditRequest,
                        limits: ServeLimits, model_names=None, default_size=512) -> GenerationRequest:
    """POST /v1/images/edits (multipart: the image and mask files, the other fields as text) -> GenerationRequest.

    The mask's fully transparent pixels (alpha 0) mark the area to repaint; it must have the image's size.
    Without a mask the image's own transparent pixels do, and an image without any is redrawn whole
    (img2img). The masked area starts from its surroundings' colours ("fill", A1111's default). size None /
    "auto": the image's aspect ratio at the area of `default_size` (the model's native size)."""
    body = fields if isinstance(fields, ImageEditRequest) else parse_request(ImageEditRequest, fields)
    if body.denoising_strength is not None:
        _check_range(body.denoising_strength, 0.0, 1.0, "denoising_strength")
    image = decode_image(image_bytes, limits, "image")
    if mask_bytes is not None:
        raw_mask = decode_image(mask_bytes, limits, "mask")
        if raw_mask.size != image.size:
            raise RequestError(f"mask is {raw_mask.width}x{raw_mask.height} but image is {image.width}x"
                               f"{image.height}; the mask must have the image's size", "mask")
        if not has_alpha(raw_mask):
            raise RequestError("mask has no alpha channel; its fully transparent pixels (alpha 0) mark the area "
                               "to repaint, so send an RGBA PNG", "mask")
        mask = alpha_mask(raw_mask)
        if mask is None:
            raise RequestError("mask has no fully transparent pixel (alpha 0), so nothing would be repainted",
                               "mask")
    else:
        mask = alpha_mask(image)
    if body.size is None or body.size.strip().lower() in ("", "auto"):
        width, height = fit_size(image.size, default_size, limits.size_multiple)
    else:
        width, height = parse_size(body.size, default_size)
    common = _openai_common(body, limits, model_names, width, height)
    return GenerationRequest(**common, image=flatten(image), mask=mask, strength=body.denoising_strength,
                             masked_content="fill" if mask is not None else "original")


def request_infotext(req: GenerationRequest, seed: int, width: int, height: int, model_name: str,
                     model_hash: str) -> str:
    """The A1111 infotext of one image of `req`, in the form ldm-generate writes (ldm_engine.infotext)."""
    clip_skip = req.clip_skip if req.clip_skip is not None and req.clip_skip > 1 else None  # A1111: from 2 on
    eta_key = {"ddim": "Eta DDIM", "tcd": "Eta"}.get(req.sampler)
    return infotext(req.prompt, req.negative_prompt, {
        "Steps": req.steps, **infotext_sampler(req.sampler), "CFG scale": f"{req.guidance_scale:g}", "Seed": seed,
        "Size": f"{width}x{height}", "Model hash": model_hash, "Model": model_name,
        "Denoising strength": req.strength if req.image is not None else None, "Clip skip": clip_skip,
        **({eta_key: f"{req.eta:g}"} if eta_key and req.eta is not None else {}),
        "Version": f"ldm_engine {__version__}"})


def a1111_response(body: Mapping, result: GenerationResult, req: GenerationRequest) -> dict:
    """txt2img / img2img answer: {"images": base64 PNGs (with their infotext), "parameters": the request
    with A1111's defaults filled in (input images left out unless include_init_images), "info": A1111's
    `Processed.js()` JSON string}."""
    schema = Img2ImgRequest if req.image is not None else Txt2ImgRequest
    try:
        parameters = schema.model_validate(dict(body)).model_dump(mode="json")
    except ValidationError:
        parameters = dict(body)
    if req.image is not None and not parameters.get("include_init_images"):
        parameters["init_images"], parameters["mask"] = None, None
    n = len(result.seeds)
    width, height = result.images[0].size if result.images else (req.width, req.height)
    info = {
        "prompt": req.prompt, "all_prompts": [req.prompt] * n,
        "negative_prompt": req.negative_prompt, "all_negative_prompts": [req.negative_prompt] * n,
        "seed": result.seeds[0] if n else -1, "all_seeds": list(result.seeds),
        "subseed": result.seeds[0] if n else -1, "all_subseeds": list(result.seeds), "subseed_strength": 0,
        "width": width, "height": height, "sampler_name": A1111_SAMPLER_NAMES.get(req.sampler, req.sampler),
        "cfg_scale": req.guidance_scale, "steps": req.steps,
        "batch_size": parameters.get("batch_size") or n, "n_iter": parameters.get("n_iter") or 1,
        "restore_faces": False, "face_restoration_model": None,
        "sd_model_name": result.model_name, "sd_model_hash": result.model_hash, "sd_vae_name": None,
        "sd_vae_hash": None, "seed_resize_from_w": -1, "seed_resize_from_h": -1,
        "denoising_strength": req.strength if req.image is not None else parameters.get("denoising_strength"),
        "extra_generation_params": {}, "index_of_first_image": 0, "infotexts": list(result.infotexts),
        "styles": parameters.get("styles") or [], "job_timestamp": time.strftime("%Y%m%d%H%M%S"),
        "clip_skip": req.clip_skip or 1, "is_using_inpainting_conditioning": bool(
            result.extra.get("is_using_inpainting_conditioning", False)),
        "version": f"ldm_engine {__version__}"}
    send = body.get("send_images", True) is not False
    images = [png_base64(im, text) for im, text in zip(result.images, result.infotexts)] if send else []
    return {"images": images, "parameters": parameters, "info": json.dumps(info)}


def openai_response(result: GenerationResult, response_format: str | None = "b64_json",
                    url_for: Callable[[bytes], str] | None = None, revised_prompt: str | None = None) -> dict:
    """OpenAI's ImagesResponse: {"created", "data": [{"b64_json" | "url", "revised_prompt"}], ...}; each PNG
    carries its infotext; with "url", `url_for(png_bytes)` stores one and returns its address."""
    fmt = response_format or "b64_json"
    if fmt not in ("b64_json", "url"):
        raise RequestError(f"response_format must be b64_json or url, got {fmt!r}", "response_format")
    if fmt == "url" and url_for is None:
        raise ValueError("response_format 'url' needs url_for(png_bytes) -> url")
    data = []
    for image, text in zip(result.images, result.infotexts):
        png = png_bytes(image, text)
        data.append({"url": url_for(png)} if fmt == "url" else {"b64_json": base64.b64encode(png).decode("ascii")})
        data[-1]["revised_prompt"] = revised_prompt
    out = {"created": int(time.time()), "data": data, "output_format": "png"}
    if result.images:
        out["size"] = f"{result.images[0].width}x{result.images[0].height}"
    return out
