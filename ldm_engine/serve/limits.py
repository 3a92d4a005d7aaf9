"""What one request may ask of the server, and the error a request that asks too much (or wrongly) gets."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ServeLimits:
    """Per-request limits; every refusal names the limit it hit (`max_pixels`, ...).

    `max_input_pixels` guards against decompression bombs: it is checked from an uploaded image's header,
    before its pixels are decoded. `size_multiple`: what width and height must be a multiple of (8, the
    autoencoder's factor; a model may need more, which its Pipeline checks)."""
    max_pixels: int = 1024 * 1024  # output width * height
    max_steps: int = 150
    max_images: int = 16  # images per request (A1111: batch_size * n_iter; OpenAI: n)
    max_body_bytes: int = 32 * 1024 * 1024  # a whole request body
    max_input_pixels: int = 4096 * 4096  # an uploaded image's width * height
    max_input_bytes: int = 16 * 1024 * 1024  # an uploaded image's encoded file
    max_prompt_chars: int = 32000  # OpenAI's own limit for a prompt
    max_mask_blur: int = 64  # A1111's slider maximum
    size_multiple: int = 8

    def __post_init__(self):
        for name, value in vars(self).items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ServeLimits.{name} must be a positive integer, got {value!r}")


class RequestError(Exception):
    """A request the server refuses: HTTP `status` (400 unless said), a message naming the offending value
    and the fix, the request field it concerns (`param`) and a short machine-readable `code`."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = "invalid_value"):
        super().__init__(message)
        self.message, self.param, self.status, self.code = message, param, status, code

    def __reduce__(self):  # keep status, param and code when pickled (Ray sends errors between processes)
        return (RequestError, (self.message, self.param, self.status, self.code))

    def __repr__(self) -> str:
        return f"RequestError({self.status}, {self.message!r}, param={self.param!r}, code={self.code!r})"
