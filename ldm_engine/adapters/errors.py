class LoraError(ValueError):
    """A LoRA / LyCORIS file that cannot be applied to the loaded model; the message names the file,
    the offending key or module and what to do. The model's weights are unchanged when it is raised."""
