class CheckpointError(ValueError):
    """A checkpoint or config that cannot be loaded; the message names the file and the problem."""
