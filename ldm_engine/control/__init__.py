"""ControlNet: the reference module, its loader, and the per-step residuals the denoiser adds."""
from .loading import read_controlnet
from .model import ControlNet, ControlNetConfig

__all__ = ["ControlNet", "ControlNetConfig", "read_controlnet"]
