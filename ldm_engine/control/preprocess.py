"""Hint preprocessors: turn a photo into the control image a ControlNet was trained on. No model weights:
Canny edges (Canny 1986, via OpenCV, as the ControlNet annotator and A1111's "canny" module), and
"none" for maps the user made (depth, pose, scribble), which only become RGB."""
from __future__ import annotations

import numpy as np
from PIL import Image

MODULES = ("none", "canny")


def _rgb(image) -> np.ndarray:
    if isinstance(image, (str, bytes)) or hasattr(image, "__fspath__"):
        image = Image.open(image)
    if isinstance(image, Image.Image):
        image = image.convert("RGB")
    arr = np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected an RGB image (PIL, path or (H, W, 3) uint8 array), got {arr.dtype} {arr.shape}")
    return arr


def canny(image, low: int = 100, high: int = 200) -> Image.Image:
    """Canny edge map (white edges on black, 3 channels) with hysteresis thresholds low < high (0..255);
    A1111's defaults 100 / 200."""
    if not 0 <= low < high <= 255:
        raise ValueError(f"Canny thresholds must satisfy 0 <= low < high <= 255, got low={low}, high={high}")
    try:
        import cv2
    except ImportError:
        raise ImportError("the Canny preprocessor needs OpenCV: pip install 'ldm_engine[canny]' "
                          "(opencv-python-headless)") from None
    edges = cv2.Canny(_rgb(image), int(low), int(high))  # (H, W) uint8, 0 or 255
    return Image.fromarray(np.repeat(edges[:, :, None], 3, axis=2))


def preprocess(image, module: str = "none", **options) -> Image.Image:
    """The control image for `module` ("canny": options low, high; "none": the image as RGB)."""
    if module == "canny":
        return canny(image, **options)
    if module == "none":
        return Image.fromarray(_rgb(image))
    raise ValueError(f"unknown preprocessor {module!r}; choose one of {', '.join(MODULES)}")
