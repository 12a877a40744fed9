"""Errors raised by more than one layer: defined here, at the bottom, so that a stage can raise
them without importing the layer that usually does (``atoll.config`` re-exports ``ConfigError``)."""


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the key and what is accepted."""
