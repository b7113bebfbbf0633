"""The error of a model description that cannot be run."""


class ConfigError(ValueError):
    """A model configuration lacks a field, names an unknown architecture or is inconsistent."""
