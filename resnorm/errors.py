"""Errors raised at the edge, worded for the user who typed the command."""


class ConfigError(ValueError):
    """A config key holds a value that cannot be used.

    The message is one line that names the key, the bad value and what is allowed.
    """

    def __init__(self, key: str, value, allowed: str):
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"{key}={value!r} is invalid: {allowed}")


class DataError(ValueError):
    """A dataset could not be loaded (missing file, empty corpus, bad contents)."""
