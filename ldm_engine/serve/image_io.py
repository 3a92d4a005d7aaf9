"""Images in and out of the serving APIs: base64 / data-URL decoding behind size guards, A1111's and
OpenAI's mask conventions, and PNGs that carry their generation parameters.

Uploaded images are untrusted: a few kilobytes of PNG can declare 30000x30000 pixels and decompress to
gigabytes (a "decompression bomb"). `decode_image` reads only the header first and refuses an image over
`ServeLimits.max_input_pixels` before any pixel is decoded.
"""
from __future__ import annotations

import base64
import binascii
import io
import warnings

import numpy as np
from PIL import Image, ImageOps

from ..images import save_png
from .limits import RequestError, ServeLimits

FORMATS = ("PNG", "JPEG", "MPO", "WEBP", "BMP", "GIF")  # what Image.open may parse (MPO: phone JPEGs)


def _encoded_bytes(data: str | bytes, limits: ServeLimits, param: str) -> bytes:
    """The image file inside `data`: bytes as they are, a str as base64 or a data:image/...;base64, URL."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        raw = bytes(data)
    elif isinstance(data, str):
        text = data.strip()
        if text.startswith(("http://", "https://")):
            raise RequestError(f"{param}: image URLs are not fetched here; send the image itself, base64-encoded",
                               param, code="invalid_image")
        if text.startswith("data:"):
            head, sep, text = text.partition(",")
            if not sep or not head.startswith("data:image/") or not head.endswith(";base64"):
                raise RequestError(f"{param}: a data URL must look like data:image/png;base64,<data>; got "
                                   f"{head[:40]!r}", param, code="invalid_image")
        text = "".join(text.split())  # MIME base64 wraps lines
        if len(text) * 3 // 4 > limits.max_input_bytes:  # refuse before decoding it
            raise _too_big(param, len(text) * 3 // 4, limits)
        try:
            raw = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
        except (binascii.Error, ValueError) as e:
            raise RequestError(f"{param}: not valid base64 ({e}); send the image file base64-encoded", param,
                               code="invalid_base64") from None
    else:
        raise RequestError(f"{param} must be a base64 string, got {type(data).__name__}", param, code="invalid_image")
    if not raw:
        raise RequestError(f"{param} is empty; send an image file", param, code="invalid_image")
    if len(raw) > limits.max_input_bytes:
        raise _too_big(param, len(raw), limits)
    return raw


def _too_big(param: str, size: int, limits: ServeLimits) -> RequestError:
    return RequestError(f"{param}: the image file is {size} bytes, over this server's limit of "
                        f"{limits.max_input_bytes} bytes (max_input_bytes); send a smaller image", param,
                        code="image_too_large")


def _too_many_pixels(param: str, size: tuple[int, int] | None, limits: ServeLimits, why: str = "") -> RequestError:
    shown = f"{size[0]}x{size[1]} = {size[0] * size[1]} pixels" if size else "more pixels than allowed"
    return RequestError(f"{param}: the image is {shown}, over this server's limit of {limits.max_input_pixels} "
                        f"pixels (max_input_pixels){why}; send a smaller image", param, code="image_too_large")


def decode_image(data: str | bytes, limits: ServeLimits, param: str = "image") -> Image.Image:
    """A decoded PIL image from base64 text, a data URL, or (bytes) the file itself.

    Refused with RequestError naming `param` and the limit: invalid base64, more than max_input_bytes,
    not a PNG / JPEG / WebP / BMP / GIF, or width*height over max_input_pixels (read from the header,
    before decoding pixels; PIL's own DecompressionBombError / Warning count the same)."""
    raw = _encoded_bytes(data, limits, param)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(raw), formats=FORMATS)  # parses the header only
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise _too_many_pixels(param, None, limits, f" ({e})") from None
    except Exception as e:  # any parser failure means the upload is not an image we read
        raise RequestError(f"{param}: not a readable PNG, JPEG, WebP, BMP or GIF image ({e})", param,
                           code="invalid_image") from None
    if image.width * image.height > limits.max_input_pixels:
        raise _too_many_pixels(param, image.size, limits)
    try:
        image.load()
    except Exception as e:  # truncated or corrupt pixel data
        raise RequestError(f"{param}: the image data is damaged ({e}); send an intact file", param,
                           code="invalid_image") from None
    return image


def has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info


def flatten(image: Image.Image, background=(255, 255, 255)) -> Image.Image:
    """RGB: transparent pixels composited onto `background` (A1111's `images.flatten`, white by default)."""
    if not has_alpha(image):
        return image.convert("RGB")
    rgba = image.convert("RGBA")
    out = Image.new("RGBA", rgba.size, (*background, 255))
    out.alpha_composite(rgba)
    return out.convert("RGB")


def gaussian_kernel_q8(sigma: float) -> np.ndarray:
    """OpenCV's 8-bit Gaussian kernel (GaussianBlur on uint8 images, which A1111 uses): 2*int(2.5*sigma+0.5)+1
    taps of exp(-x^2 / 2 sigma^2), normalized, quantized to 1/256 from the outside in with error
    diffusion, the centre taking what is left so that the integer weights sum to exactly 256."""
    radius = int(2.5 * sigma + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-x * x / (2.0 * sigma * sigma))
    k /= k.sum()
    q, err = np.zeros(2 * radius + 1, dtype=np.int64), 0.0
    for i in range(radius):
        adjusted = k[i] * 256 + err
        q[i] = q[-1 - i] = int(np.rint(adjusted))
        err = adjusted - q[i]
    q[radius] = 256 - 2 * q[:radius].sum()
    return q


def gaussian_blur_1d(mask: np.ndarray, sigma: float, axis: int) -> np.ndarray:
    """uint8 (H, W) blurred along one axis exactly as cv2.GaussianBlur(mask, (k, 1) or (1, k), sigma) blurs it:
    the fixed-point kernel above, reflect-101 borders, the sum rounded half up from 1/256 units."""
    q = gaussian_kernel_q8(sigma)
    radius, n = len(q) // 2, mask.shape[axis]
    pad = [(0, 0), (0, 0)]
    pad[axis] = (radius, radius)
    padded = np.pad(mask.astype(np.int64), pad, mode="reflect")  # numpy's "reflect" is OpenCV's REFLECT_101
    acc = np.zeros(mask.shape, dtype=np.int64)
    for j, w in enumerate(q):  # one shifted (H, W) slice per tap
        acc += w * (padded[:, j:j + n] if axis == 1 else padded[j:j + n, :])
    return np.clip((acc + 128) >> 8, 0, 255).astype(np.uint8)


def a1111_mask(mask: Image.Image, invert: bool = False, blur_x: int = 4, blur_y: int = 4) -> Image.Image:
    """A1111's inpainting mask ("L", white = repaint): an RGBA mask with any transparency gives its alpha
    thresholded at 128 (A1111's `create_binary_mask`), any other its greyscale; then inverted if asked,
    then Gaussian-blurred along x (sigma blur_x) and y (sigma blur_y) as A1111's img2img does."""
    if mask.mode == "RGBA" and mask.getextrema()[-1] != (255, 255):
        m = mask.getchannel("A").point(lambda v: 255 if v > 128 else 0)
    else:
        m = mask.convert("L")
    if invert:
        m = ImageOps.invert(m)
    arr = np.asarray(m, dtype=np.uint8)
    if blur_x > 0:
        arr = gaussian_blur_1d(arr, blur_x, axis=1)
    if blur_y > 0:
        arr = gaussian_blur_1d(arr, blur_y, axis=0)
    return Image.fromarray(arr, "L")


def alpha_mask(image: Image.Image) -> Image.Image | None:
    """OpenAI's edit mask ("L", white = repaint) from an image's alpha: its fully transparent pixels
    (alpha 0) mark the area to repaint. None when no pixel is fully transparent."""
    if not has_alpha(image):
        return None
    transparent = np.asarray(image.convert("RGBA").getchannel("A")) == 0
    if not transparent.any():
        return None
    return Image.fromarray(np.where(transparent, 255, 0).astype(np.uint8), "L")


def png_bytes(image: Image.Image, infotext: str) -> bytes:
    """The image as PNG with `infotext` in its `parameters` text chunk (as ldm-generate writes it)."""
    buf = io.BytesIO()
    save_png(image, buf, {}, infotext)
    return buf.getvalue()


def png_base64(image: Image.Image, infotext: str) -> str:
    return base64.b64encode(png_bytes(image, infotext)).decode("ascii")
