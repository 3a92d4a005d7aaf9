"""The embedded default model: a small text-to-image LDM trained on procedural shapes
(`python -m ldm_engine.training.shapes`), shipped inside the package."""
from __future__ import annotations

from pathlib import Path

DEFAULT_MODEL = Path(__file__).parent / "assets" / "shapes-ldm.safetensors"


def default_model() -> Path:
    if not DEFAULT_MODEL.is_file():
        raise FileNotFoundError(f"the embedded default model is missing ({DEFAULT_MODEL}); reinstall ldm_engine, "
                                f"or pass a model path")
    return DEFAULT_MODEL
