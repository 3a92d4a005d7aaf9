"""Offline loading of original single-file checkpoints and diffusers folders."""
from .checkpoint import LoadedModel, load_checkpoint, random_model
from .errors import CheckpointError

__all__ = ["LoadedModel", "load_checkpoint", "random_model", "CheckpointError"]
