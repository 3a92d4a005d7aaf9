"""LoRA and LyCORIS adapters: file readers (kohya / A1111 / LyCORIS / PEFT / diffusers), key maps onto
the reference modules, and merging into the weights with a bit-exact restore.

    pipe = Pipeline.from_pretrained("sd15.safetensors", lora_dirs=["loras/"])
    name = pipe.load_lora("loras/style.safetensors", scale=0.8)   # merged: no per-step cost
    pipe.set_lora_scale(name, 0.5)
    pipe("a castle <lora:detail:0.6>")                            # for this call only
    pipe.unload_loras()                                           # the original weights, bit for bit
"""
from __future__ import annotations

import functools

from .errors import LoraError
from .formats import LoraFile, ModuleWeights, parse_lora
from .keymap import Target, build_targets
from .manager import LoraManager
from .tags import LoraTag, available_loras, extract_lora_tags, file_hash, find_lora, hashes_text


def restores_prompt_loras(call):
    """Wraps Pipeline.__call__: LoRAs that the call's prompt tags loaded are unloaded when it returns
    or raises."""

    @functools.wraps(call)
    def wrapper(self, *args, **kwargs):
        try:
            return call(self, *args, **kwargs)
        finally:
            self.adapters.end_call()

    return wrapper


__all__ = ["LoraError", "LoraFile", "ModuleWeights", "parse_lora", "Target", "build_targets", "LoraManager", "LoraTag",
           "available_loras", "extract_lora_tags", "file_hash", "find_lora", "hashes_text", "restores_prompt_loras"]
