"""Errors a user can act on: each message says what was looked for and how to provide it."""


class WeightsNotFoundError(FileNotFoundError):
    """Pretrained weights are not on this machine. FiLo Inspect never substitutes random weights."""


class CheckpointError(ValueError):
    """A FiLo checkpoint that cannot be used with this model (wrong format, keys or shapes)."""
