"""Reference modules: plain PyTorch, the truth every fast path is checked against."""
from .autoencoder import AutoencoderKL, VQModel, build_autoencoder
from .bert import BERTEncoder
from .configs import (PRESETS, AutoencoderConfig, BERTConfig, LDMConfig, ScheduleConfig, TextEncoderConfig, UNetConfig,
                      get_preset)
from .text_encoder import ClassEmbedder, CLIPTextEncoder
from .tokenizer import CLIPTokenizer
from .unet import UNetModel
from .wordpiece import WordPieceTokenizer

__all__ = [
    "AutoencoderKL", "VQModel", "build_autoencoder", "PRESETS", "AutoencoderConfig", "LDMConfig", "ScheduleConfig",
    "TextEncoderConfig", "UNetConfig", "get_preset", "ClassEmbedder", "CLIPTextEncoder", "CLIPTokenizer", "UNetModel",
    "BERTConfig", "BERTEncoder", "WordPieceTokenizer",
]
