"""The serving request/response layer (ldm_engine.serve.schemas / convert): pure, no Ray, no model.

A1111's defaults and names, seeds, every limit, image decoding (base64, data URLs, decompression bombs),
A1111 and OpenAI masks, infotexts, and responses read back by the real clients (webuiapi, openai)."""
from __future__ import annotations

import base64
import io
import json
import pickle
import struct
import types
import zlib

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from ldm_engine.infotext import parse_infotext
from ldm_engine.sampling import SAMPLERS
from ldm_engine.serve import convert, schemas
from ldm_engine.serve.convert import RequestError, ServeLimits
from ldm_engine.serve.image_io import a1111_mask, gaussian_blur_1d
from ldm_engine.serve.request import GenerationRequest, GenerationResult

LIMITS = ServeLimits()
NAMES = ["sd15", "other"]


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def b64(image: Image.Image) -> str:
    return base64.b64encode(png(image)).decode()


def bomb_png(width: int, height: int) -> bytes:
    """A valid 1-bit greyscale PNG of width x height zeros: a few kB that decode to width*height pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    row, z = bytes(1 + (width + 7) // 8), zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def refused(fn, *args, param=None, contains=(), status=400, **kwargs) -> RequestError:
    with pytest.raises(RequestError) as info:
        fn(*args, **kwargs)
    e = info.value
    assert e.status == status, e
    if param is not None:
        assert e.param == param, e
    for text in (contains,) if isinstance(contains, str) else contains:
        assert text in e.message, e
    return e


def txt2img(**fields) -> GenerationRequest:
    return convert.txt2img_request(schemas.Txt2ImgRequest.model_validate(fields), LIMITS, NAMES)


def img2img(limits=LIMITS, **fields) -> GenerationRequest:
    return convert.img2img_request(schemas.Img2ImgRequest.model_validate(fields), limits, NAMES)


# ---- schemas and defaults ------------------------------------------------------------------------------

def test_a1111_defaults():
    """The fields' defaults are A1111's (StableDiffusionProcessing* + its API's extras)."""
    t = schemas.Txt2ImgRequest()
    expected = dict(prompt="", negative_prompt="", seed=-1, subseed=-1, subseed_strength=0, sampler_name=None,
                    sampler_index="Euler", scheduler=None, batch_size=1, n_iter=1, steps=50, cfg_scale=7.0,
                    width=512, height=512, eta=None, denoising_strength=0.75, override_settings=None,
                    send_images=True, save_images=False, alwayson_scripts={}, script_args=[], enable_hr=False,
                    hr_scale=2.0, seed_resize_from_h=-1, seed_resize_from_w=-1)
    assert {k: getattr(t, k) for k in expected} == expected
    i = schemas.Img2ImgRequest()
    expected = dict(init_images=None, resize_mode=0, denoising_strength=0.75, mask=None, mask_blur_x=4,
                    mask_blur_y=4, mask_blur=None, inpainting_fill=0, inpaint_full_res=True,
                    inpaint_full_res_padding=0, inpainting_mask_invert=0, include_init_images=False)
    assert {k: getattr(i, k) for k in expected} == expected
    req = txt2img()
    assert (req.steps, req.guidance_scale, req.width, req.height, req.sampler, req.n_images) == \
        (50, 7.0, 512, 512, "euler", 1)  # A1111's API default sampler: sampler_index "Euler"
    assert req.model is None and req.clip_skip is None and req.source == "a1111"


def test_unknown_fields_ignored_and_nulls_accepted():
    body = schemas.Txt2ImgRequest.model_validate({"prompt": "x", "not_a_field": 1, "controlnet_units": [],
                                                  "seed": None, "sampler_name": None, "steps": "20"})
    assert not hasattr(body, "not_a_field") and body.steps == 20
    req = convert.txt2img_request(body, LIMITS, NAMES)
    assert req.steps == 20 and len(req.seeds) == 1 and req.sampler == "euler"


def webui_client():
    import webuiapi

    api = webuiapi.WebUIApi.__new__(webuiapi.WebUIApi)  # no __init__: it probes a server
    api.baseurl, api.default_sampler, api.default_scheduler, api.default_steps = "http://x/sdapi/v1", "Euler a", \
        "automatic", 20
    api.has_controlnet = api.has_adetailer = api.has_animatediff = False
    sent = {}
    api.post_and_get_api_result = lambda url, payload, use_async: sent.update(url=url, payload=payload)
    return api, sent


def test_webuiapi_default_payloads_convert():
    """What the webuiapi client sends by default (eta 1, s_noise 1, inpaint_full_res, ...) is accepted."""
    pytest.importorskip("webuiapi")
    api, sent = webui_client()
    api.txt2img(prompt="a cat", seed=3, batch_size=2, width=64, height=64)
    req = txt2img(**sent["payload"])
    assert (req.sampler, req.steps, req.seeds, req.eta) == ("euler_a", 20, [3, 4], None)
    image, mask = Image.new("RGB", (64, 64), (200, 10, 10)), Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    api.img2img(images=[image], mask_image=mask, prompt="a dog", sampler_name="DDIM", width=64, height=64)
    req = img2img(**sent["payload"])
    assert (req.sampler, req.eta, req.strength, req.masked_content) == ("ddim", 1.0, 0.75, "fill")
    assert req.image.size == (64, 64) and req.mask.mode == "L" and req.mask.getpixel((32, 32)) == 255


@pytest.mark.parametrize("field,value", [("enable_hr", True), ("restore_faces", True), ("tiling", True),
                                         ("subseed_strength", 0.5), ("script_name", "x/y/z plot"),
                                         ("alwayson_scripts", {"ControlNet": {"args": []}}), ("s_churn", 1.0)])
def test_features_not_run_here_are_refused(field, value):
    refused(txt2img, param=field, contains="not supported", **{field: value})


# ---- samplers ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,scheduler,ours", [
    ("Euler a", None, "euler_a"), ("k_euler_a", None, "euler_a"), ("EULER A", "automatic", "euler_a"),
    ("k_euler_ancestral", "Uniform", "euler_a"), ("Euler", None, "euler"), ("DDIM", "Automatic", "ddim"),
    ("PLMS", None, "plms"), ("DDPM", None, "ddpm"), ("LCM", None, "lcm"), ("TCD", "", "tcd"),
    ("DPM++ 2M Karras", None, "dpmpp_2m_karras"), ("DPM++ 2M", "Karras", "dpmpp_2m_karras"),
    ("dpm++ 2m", "karras", "dpmpp_2m_karras"), ("k_dpmpp_2m_ka", None, "dpmpp_2m_karras"),
    ("DPM++ 2M", None, "dpmpp_2m_karras"),  # A1111 >= 1.9: "Automatic" is DPM++ 2M's own Karras
    ("DPM++ 2M", "Uniform", "dpmpp_2m"), ("k_dpmpp_2m", "uniform", "dpmpp_2m"),
    ("dpmpp_2m", None, "dpmpp_2m"), ("euler_a", None, "euler_a"), ("dpmpp_2m", "Karras", "dpmpp_2m_karras"),
    (None, None, "euler"), ("", "", "euler")])
def test_a1111_sampler_names(name, scheduler, ours):
    assert convert.a1111_sampler(name, scheduler) == ours
    assert ours in SAMPLERS


def test_bad_sampler_and_scheduler_names():
    refused(convert.a1111_sampler, "Heun", None, param="sampler_name", contains=("'Heun'", "Euler a", "DPM++ 2M"))
    refused(convert.a1111_sampler, "DPM++ 2M SDE Karras", None, param="sampler_name")
    refused(convert.a1111_sampler, "Euler", "Exponential", param="scheduler", contains=("Automatic", "Karras"))
    refused(convert.a1111_sampler, "Euler", "Karras", param="scheduler", contains="Uniform")
    refused(convert.a1111_sampler, "DDIM", "Karras", param="scheduler", contains="Automatic")
    refused(txt2img, sampler_name="UniPC", param="sampler_name")


def test_sampler_and_scheduler_lists():
    samplers = [schemas.SamplerItem(**s) for s in convert.a1111_samplers()]
    assert {"Euler a", "Euler", "DPM++ 2M", "DDIM", "PLMS", "LCM", "TCD", "DDPM"} == {s.name for s in samplers}
    for s in samplers:
        assert convert.a1111_sampler(s.name, None) in SAMPLERS
        assert all(convert.a1111_sampler(a, None) == convert.a1111_sampler(s.name, None) for a in s.aliases)
    schedulers = [schemas.SchedulerItem(**s) for s in convert.a1111_schedulers()]
    assert [s.label for s in schedulers] == ["Automatic", "Uniform", "Karras"]
    assert txt2img(sampler_name=None, sampler_index="DDIM").sampler == "ddim"  # sampler_name or sampler_index


# ---- seeds ---------------------------------------------------------------------------------------------

def test_seeds_are_seed_plus_i():
    assert txt2img(seed=100, batch_size=2, n_iter=3).seeds == [100, 101, 102, 103, 104, 105]


def test_seed_minus_one_draws_in_a1111s_range(monkeypatch):
    asked = []
    monkeypatch.setattr(convert.random, "randrange", lambda n: asked.append(n) or 41)
    assert txt2img(seed=-1, batch_size=3).seeds == [41, 42, 43]
    assert asked == [4294967294]  # A1111's get_fixed_seed: random.randrange(4294967294)
    monkeypatch.undo()
    draws = {txt2img(seed=-1).seeds[0] for _ in range(8)}
    assert len(draws) > 1 and all(0 <= s < 4294967294 for s in draws)
    refused(txt2img, seed=-5, param="seed")


def test_openai_seeds_random_per_image(monkeypatch):
    draws = iter([7, 900, 3])
    monkeypatch.setattr(convert.random, "randrange", lambda n: next(draws))
    body = schemas.ImageGenerationRequest(prompt="x", n=3)
    assert convert.openai_generation_request(body, LIMITS, NAMES, (512, 512)).seeds == [7, 900, 3]
    body = schemas.ImageGenerationRequest(prompt="x", n=2, seed=10)
    assert convert.openai_generation_request(body, LIMITS, NAMES, 512).seeds == [10, 11]


# ---- limits --------------------------------------------------------------------------------------------

def test_each_limit_is_named():
    refused(txt2img, width=500, param="width", contains=("multiple of 8", "496"))
    refused(txt2img, height=0, param="height", contains="multiple of 8")
    refused(txt2img, width=2048, height=1024, contains=("2097152", "max_pixels"))
    refused(txt2img, steps=0, param="steps", contains="max_steps")
    refused(txt2img, steps=151, param="steps", contains="max_steps")
    refused(txt2img, batch_size=17, param="batch_size", contains="max_images")
    refused(txt2img, batch_size=4, n_iter=5, param="n_iter", contains=("20 images", "max_images"))
    refused(txt2img, prompt="x" * 32001, param="prompt", contains="max_prompt_chars")
    refused(txt2img, cfg_scale=-1, param="cfg_scale")
    refused(txt2img, sampler_name="TCD", eta=1.5, param="eta")
    refused(txt2img, override_settings={"CLIP_stop_at_last_layers": 0},
            param="override_settings.CLIP_stop_at_last_layers")
    small = ServeLimits(max_images=4, size_multiple=64)
    refused(convert.openai_generation_request, schemas.ImageGenerationRequest(prompt="x", n=5), small, NAMES, 512,
            param="n", contains="max_images")
    refused(convert.openai_generation_request, schemas.ImageGenerationRequest(prompt="x", size="520x512"), small,
            NAMES, 512, param="size", contains="multiple of 64")
    with pytest.raises(ValueError, match="max_steps"):
        ServeLimits(max_steps=0)


def test_openai_size_and_n():
    req = convert.openai_generation_request(schemas.ImageGenerationRequest(prompt="x", size="640x512"), LIMITS,
                                            NAMES, 512)
    assert (req.width, req.height, req.source, req.n_images) == (640, 512, "openai", 1)
    for size in (None, "auto"):
        req = convert.openai_generation_request(schemas.ImageGenerationRequest(prompt="x", size=size), LIMITS,
                                                NAMES, (768, 512))
        assert (req.width, req.height) == (768, 512)
    refused(convert.openai_generation_request, schemas.ImageGenerationRequest(prompt="x", size="2048x2048"),
            LIMITS, NAMES, 512, param="size", contains="max_pixels")
    refused(convert.openai_generation_request, schemas.ImageGenerationRequest(prompt="x", size="big"),
            LIMITS, NAMES, 512, param="size", contains="WIDTHxHEIGHT")
    refused(convert.parse_request, schemas.ImageGenerationRequest, {"prompt": "x", "n": 11}, param="n")
    refused(convert.parse_request, schemas.ImageGenerationRequest, {"n": 1}, param="prompt")
    refused(convert.openai_generation_request, schemas.ImageGenerationRequest(prompt="  "), LIMITS, NAMES, 512,
            param="prompt")


def test_models_resolve_or_404():
    assert txt2img(override_settings={"sd_model_checkpoint": "sd15 [6ce0161689]"}).model == "sd15"
    assert txt2img(override_settings={"sd_model_checkpoint": "SD15.safetensors"}).model == "sd15"
    assert convert.resolve_model("6ce0161689", {"sd15": {"hash": "6ce0161689"}}) == "sd15"
    assert convert.resolve_model(None, NAMES) is None
    e = refused(txt2img, override_settings={"sd_model_checkpoint": "sdxl"}, status=404,
                param="override_settings.sd_model_checkpoint", contains=("'sdxl'", "sd15, other"))
    assert e.code == "model_not_found"
    refused(convert.openai_generation_request, schemas.ImageGenerationRequest(prompt="x", model="dall-e-3"), LIMITS,
            NAMES, 512, param="model", status=404)


# ---- images in -----------------------------------------------------------------------------------------

def test_decode_image_forms():
    image = Image.new("RGB", (24, 16), (1, 2, 3))
    for data in (b64(image), "data:image/png;base64," + b64(image), png(image),
                 "\n".join(b64(image)[i:i + 76] for i in range(0, len(b64(image)), 76))):  # MIME line breaks
        out = convert.decode_image(data, LIMITS, "init_images[0]")
        assert out.size == (24, 16) and out.getpixel((0, 0)) == (1, 2, 3)
    assert convert.decode_image(b64(image).rstrip("="), LIMITS, "x").size == (24, 16)  # padding left off


def test_decode_image_refusals():
    image_b64 = b64(Image.new("RGB", (8, 8)))
    refused(convert.decode_image, "!!not base64!!", LIMITS, "init_images[0]", param="init_images[0]",
            contains="base64")
    refused(convert.decode_image, base64.b64encode(b"hello, not an image").decode(), LIMITS, "mask", param="mask",
            contains="not a readable")
    refused(convert.decode_image, "", LIMITS, "image", param="image", contains="empty")
    refused(convert.decode_image, "https://example.com/a.png", LIMITS, "image", contains="not fetched")
    refused(convert.decode_image, "data:text/plain;base64," + image_b64, LIMITS, "image", contains="data URL")
    refused(convert.decode_image, png(Image.new("RGB", (64, 64)))[:60], LIMITS, "image", param="image")
    tiff = io.BytesIO()
    Image.new("RGB", (8, 8)).save(tiff, "TIFF")
    refused(convert.decode_image, tiff.getvalue(), LIMITS, "image", contains="not a readable")
    noisy = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    refused(convert.decode_image, b64(noisy), ServeLimits(max_input_bytes=1000), "image", contains="max_input_bytes")
    refused(convert.decode_image, png(noisy), ServeLimits(max_input_bytes=1000), "image", contains="max_input_bytes")
    refused(convert.decode_image, image_b64, ServeLimits(max_input_pixels=63), "image",
            contains=("8x8 = 64 pixels", "max_input_pixels"))


@pytest.fixture(scope="module")
def bomb_30k() -> bytes:
    return bomb_png(30000, 30000)  # 900M pixels in about 110 kB


def test_decompression_bomb_refused_from_the_header(monkeypatch, bomb_30k):
    """Our limit is read from the header: the pixels of an 8000x8000 PNG are never decoded."""
    data = bomb_png(8000, 8000)
    assert len(data) < 20000

    def no_decoding(self):
        raise AssertionError("pixels were decoded")
    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", no_decoding)
    refused(convert.decode_image, base64.b64encode(data).decode(), LIMITS, "init_images[0]",
            param="init_images[0]", contains=("8000x8000", "max_input_pixels"))
    refused(convert.decode_image, bomb_30k, LIMITS, "mask", param="mask", contains="max_input_pixels")


def test_pil_decompression_bomb_error_and_warning_refused(bomb_30k):
    lax = ServeLimits(max_input_pixels=10 ** 10, max_input_bytes=10 ** 8)
    refused(convert.decode_image, bomb_30k, lax, "image", contains=("max_input_pixels", "decompression bomb"))
    refused(convert.decode_image, bomb_png(10000, 10000), lax, "image", contains="max_input_pixels")  # PIL warns


# ---- masks ---------------------------------------------------------------------------------------------

def square_mask(size=(64, 48), box=(16, 8, 40, 32), mode="L") -> Image.Image:
    mask = Image.new("L", size, 0)
    mask.paste(255, box)
    return mask.convert(mode)


def test_img2img_mask_size_must_match():
    image = b64(Image.new("RGB", (64, 48)))
    refused(img2img, init_images=[image], mask=b64(square_mask((48, 48))), param="mask",
            contains=("48x48", "64x48"))
    refused(img2img, init_images=[], param="init_images")
    refused(img2img, init_images=[image, image], param="init_images")
    refused(img2img, init_images=[image], denoising_strength=1.5, param="denoising_strength")
    refused(img2img, init_images=[image], mask=b64(square_mask()), inpainting_fill=4, param="inpainting_fill")
    refused(img2img, init_images=[image], mask=b64(square_mask()), mask_blur=65, param="mask_blur",
            contains="max_mask_blur")
    refused(img2img, init_images=[image], resize_mode=1, param="resize_mode")


def test_img2img_mask_invert_blur_fill():
    image, mask = b64(Image.new("RGB", (64, 48), (9, 9, 9))), square_mask()
    sharp = img2img(init_images=[image], mask=b64(mask), mask_blur=0)
    assert np.array_equal(np.asarray(sharp.mask), np.asarray(mask))
    assert (sharp.masked_content, sharp.strength, sharp.image.mode) == ("fill", 0.75, "RGB")
    inverted = img2img(init_images=[image], mask=b64(mask), mask_blur=0, inpainting_mask_invert=1,
                       inpainting_fill=2, denoising_strength=0.5)
    assert np.array_equal(np.asarray(inverted.mask), 255 - np.asarray(mask))
    assert (inverted.masked_content, inverted.strength) == ("latent_noise", 0.5)
    blurred = np.asarray(img2img(init_images=[image], mask=b64(mask)).mask)  # default blur 4 along x and y
    assert 0 < blurred[20, 16] < 255 and blurred[20, 28] == 255 and blurred[0, 0] == 0
    x_only = np.asarray(img2img(init_images=[image], mask=b64(mask), mask_blur_y=0).mask)
    assert np.array_equal(x_only[:8], np.zeros_like(x_only[:8]))  # rows above the square untouched by an x blur
    # an RGBA mask with transparency: its alpha, thresholded at 128 (A1111's create_binary_mask)
    rgba = Image.new("RGBA", (64, 48), (0, 0, 0, 0))
    rgba.paste((0, 0, 0, 200), (16, 8, 40, 32))
    assert np.array_equal(np.asarray(a1111_mask(rgba, blur_x=0, blur_y=0)), np.asarray(mask))


def test_mask_blur_is_a1111s_cv2_blur_exactly():
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(0)
    for shape, sigma in (((48, 64), 4), ((5, 7), 16), ((37, 29), 1), ((64, 64), 64), ((40, 50), 7)):
        mask = (rng.random(shape) > 0.5).astype(np.uint8) * 255
        k = 2 * int(2.5 * sigma + 0.5) + 1  # A1111's kernel size for mask_blur = sigma
        ref = cv2.GaussianBlur(cv2.GaussianBlur(mask, (k, 1), sigma), (1, k), sigma)
        ours = gaussian_blur_1d(gaussian_blur_1d(mask, sigma, axis=1), sigma, axis=0)
        assert np.abs(ours.astype(int) - ref).max() == 0, (shape, sigma)
        full = np.asarray(a1111_mask(Image.fromarray(mask), blur_x=sigma, blur_y=sigma))
        assert np.array_equal(full, ref)


def test_openai_edit_alpha_mask_rule():
    photo = Image.new("RGB", (64, 48), (50, 60, 70))
    rgba = Image.new("RGBA", (64, 48), (0, 0, 0, 255))
    rgba.paste((0, 0, 0, 0), (16, 8, 40, 32))  # fully transparent: repaint
    rgba.paste((0, 0, 0, 1), (0, 0, 4, 4))  # almost transparent: kept
    req = convert.openai_edit_request(png(photo), png(rgba), {"prompt": "x", "n": "2", "size": "64x48"}, LIMITS,
                                      NAMES, 512)
    assert np.array_equal(np.asarray(req.mask), np.asarray(square_mask()))
    assert (req.masked_content, req.n_images, req.width, req.source) == ("fill", 2, 64, "openai")
    refused(convert.openai_edit_request, png(photo), png(rgba.resize((32, 32))), {"prompt": "x"}, LIMITS, NAMES,
            512, param="mask", contains="size")
    refused(convert.openai_edit_request, png(photo), png(square_mask(mode="RGB")), {"prompt": "x"}, LIMITS, NAMES,
            512, param="mask", contains="alpha")
    refused(convert.openai_edit_request, png(photo), png(Image.new("RGBA", (64, 48), (0, 0, 0, 255))),
            {"prompt": "x"}, LIMITS, NAMES, 512, param="mask", contains="transparent")
    own = photo.convert("RGBA")
    own.paste((0, 0, 0, 0), (16, 8, 40, 32))
    req = convert.openai_edit_request(png(own), None, {"prompt": "x"}, LIMITS, NAMES, 512)
    assert np.array_equal(np.asarray(req.mask.resize((64, 48))), np.asarray(square_mask()))
    assert req.image.mode == "RGB"
    whole = convert.openai_edit_request(png(photo), None, {"prompt": "x"}, LIMITS, NAMES, 512)
    assert whole.mask is None and whole.image is not None  # no transparency: the whole image is redrawn
    wide = convert.openai_edit_request(png(Image.new("RGB", (1024, 768))), None, {"prompt": "x"}, LIMITS, NAMES,
                                       512)
    assert (wide.width, wide.height) == (584, 440)  # the image's aspect at the model's native area
    refused(convert.openai_edit_request, png(photo), None, {"prompt": "x", "n": "zero"}, LIMITS, NAMES, 512,
            param="n")


# ---- images out ----------------------------------------------------------------------------------------

def generated(req: GenerationRequest, size=(32, 24)) -> GenerationResult:
    images = [Image.new("RGB", size, (i * 40, 0, 0)) for i in range(req.n_images)]
    texts = [convert.request_infotext(req, s, *size, "sd15", "6ce0161689") for s in req.seeds]
    return GenerationResult(images, list(req.seeds), texts, "sd15", "6ce0161689")


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_infotext_round_trips(sampler):
    req = GenerationRequest(prompt="a cat, sitting: on a mat\nsecond line", negative_prompt="blurry, dark",
                            seeds=[5], steps=23, guidance_scale=7.5, sampler=sampler, clip_skip=2,
                            image=Image.new("RGB", (8, 8)), strength=0.6, eta=0.3 if sampler == "tcd" else None)
    text = convert.request_infotext(req, 5, 640, 512, "sd15", "6ce0161689")
    prompt, negative, fields = parse_infotext(text)
    assert (prompt, negative) == (req.prompt, req.negative_prompt)
    assert {k: fields[k] for k in ("Steps", "CFG scale", "Seed", "Size", "Model hash", "Model", "Clip skip",
                                   "Denoising strength")} == \
        {"Steps": "23", "CFG scale": "7.5", "Seed": "5", "Size": "640x512", "Model hash": "6ce0161689",
         "Model": "sd15", "Clip skip": "2", "Denoising strength": "0.6"}
    assert fields["Version"].startswith("ldm_engine ")
    assert convert.a1111_sampler(fields["Sampler"], fields.get("Schedule type")) == sampler  # A1111 reads it back


def test_png_carries_parameters():
    image = Image.new("RGB", (16, 16), (3, 4, 5))
    data = convert.png_bytes(image, "a cat\nSteps: 1, Seed: 2, Size: 16x16")
    assert Image.open(io.BytesIO(data)).info["parameters"] == "a cat\nSteps: 1, Seed: 2, Size: 16x16"
    assert base64.b64decode(convert.png_base64(image, "x")) == convert.png_bytes(image, "x")


def test_a1111_response_reads_back_with_webuiapi():
    pytest.importorskip("webuiapi")
    body = {"prompt": "a cat", "seed": 9, "batch_size": 2, "n_iter": 2, "sampler_name": "DPM++ 2M",
            "override_settings": {"CLIP_stop_at_last_layers": 2}}
    req = txt2img(**body)
    result = generated(req)
    answer = json.loads(json.dumps(convert.a1111_response(body, result, req)))  # what travels as JSON
    api, _ = webui_client()
    got = api._to_api_result(types.SimpleNamespace(status_code=200, json=lambda: answer, text=""))
    assert len(got.images) == 4 and got.image.size == (32, 24)
    assert [im.info["parameters"] for im in got.images] == result.infotexts
    info = got.info
    assert isinstance(info, dict) and isinstance(got.parameters, dict)
    assert info["all_seeds"] == [9, 10, 11, 12] and info["seed"] == 9 and info["all_subseeds"] == info["all_seeds"]
    assert (info["prompt"], info["all_prompts"], info["sampler_name"], info["steps"], info["cfg_scale"]) == \
        ("a cat", ["a cat"] * 4, "DPM++ 2M Karras", 50, 7.0)
    assert (info["width"], info["height"], info["batch_size"], info["n_iter"], info["clip_skip"]) == (32, 24, 2, 2, 2)
    assert (info["sd_model_name"], info["sd_model_hash"], info["infotexts"]) == ("sd15", "6ce0161689",
                                                                                result.infotexts)
    for key in ("negative_prompt", "all_negative_prompts", "subseed", "denoising_strength", "job_timestamp",
                "index_of_first_image", "styles", "extra_generation_params", "is_using_inpainting_conditioning"):
        assert key in info
    assert got.parameters["seed"] == 9 and got.parameters["steps"] == 50  # the body with A1111's defaults
    quiet = convert.a1111_response({**body, "send_images": False}, result, req)
    assert quiet["images"] == []


def test_img2img_response_leaves_input_images_out():
    image = b64(Image.new("RGB", (32, 24)))
    body = {"init_images": [image], "width": 32, "height": 24, "denoising_strength": 0.4}
    req = img2img(**body)
    answer = convert.a1111_response(body, generated(req), req)
    assert answer["parameters"]["init_images"] is None and json.loads(answer["info"])["denoising_strength"] == 0.4
    kept = convert.a1111_response({**body, "include_init_images": True}, generated(req), req)
    assert kept["parameters"]["init_images"] == [image]


def test_openai_response_reads_back_with_openai():
    from openai.types import ImagesResponse

    req = convert.openai_generation_request(schemas.ImageGenerationRequest(prompt="x", n=2), LIMITS, NAMES, 32)
    result = generated(req)
    answer = ImagesResponse.model_validate(convert.openai_response(result, "b64_json"))
    assert len(answer.data) == 2 and answer.created > 0
    first = Image.open(io.BytesIO(base64.b64decode(answer.data[0].b64_json)))
    assert first.info["parameters"] == result.infotexts[0]
    stored = []
    by_url = ImagesResponse.model_validate(convert.openai_response(
        result, "url", lambda data: stored.append(data) or f"http://h/v1/files/{len(stored)}.png"))
    assert [d.url for d in by_url.data] == ["http://h/v1/files/1.png", "http://h/v1/files/2.png"]
    assert Image.open(io.BytesIO(stored[1])).info["parameters"] == result.infotexts[1]
    refused(convert.openai_response, result, "jpeg", param="response_format")


# ---- errors and jobs -----------------------------------------------------------------------------------

def test_error_shapes():
    assert schemas.openai_error(400, "bad n", param="n", code="invalid_value") == \
        {"error": {"message": "bad n", "type": "invalid_request_error", "param": "n", "code": "invalid_value"}}
    assert schemas.openai_error(503, "down")["error"]["type"] == "server_error"
    e = pickle.loads(pickle.dumps(RequestError("no such model", "model", status=404, code="model_not_found")))
    assert (e.message, e.param, e.status, e.code) == ("no such model", "model", 404, "model_not_found")


def test_job_requests():
    image = b64(Image.new("RGB", (32, 24)))
    body = schemas.JobRequest.model_validate({"init_images": [image], "width": 32, "height": 24})
    assert body.kind == "img2img"
    req = convert.job_request(body, LIMITS, NAMES)
    assert req.source == "jobs" and req.image is not None
    plain = schemas.JobRequest.model_validate({"prompt": "x", "enable_hr": False})
    assert plain.kind == "txt2img" and convert.job_request(plain, LIMITS, NAMES).image is None
    refused(convert.parse_request, schemas.JobRequest, {"kind": "txt2img", "init_images": [image]}, param=None,
            contains="kind")
    refused(convert.job_request, schemas.JobRequest(enable_hr=True), LIMITS, NAMES, param="enable_hr")
