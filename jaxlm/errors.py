"""The one exception type for mistakes a user can fix.

The CLI prints these as a single line and exits non-zero; anything else is a bug
and keeps its traceback.
"""


class JaxlmError(Exception):
    """A problem with the user's input (config, data, tokenizer, checkpoint)."""


class ConfigError(JaxlmError):
    """A config key is unknown, mistyped or out of range."""

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        super().__init__(f"config key '{key}': {message}")


class NonFiniteLoss(JaxlmError):
    """The run stopped because a step's loss or gradients were NaN or infinite."""
