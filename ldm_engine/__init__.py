"""ldm_engine: an inference engine for latent diffusion models (LDM, Stable Diffusion 1.x/2.x)."""
__version__ = "0.1.0"

from .info import build_info
from .loading import CheckpointError, LoadedModel, load_checkpoint
from .models import PRESETS, LDMConfig, get_preset
from .pipeline import Pipeline, PipelineOutput

__all__ = ["__version__", "build_info", "CheckpointError", "LoadedModel", "load_checkpoint", "PRESETS", "LDMConfig",
           "get_preset", "Pipeline", "PipelineOutput"]
