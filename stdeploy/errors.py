"""The small error hierarchy every layer raises. Each is a ``ValueError`` so callers that only know
the standard library still catch it; the CLI turns any of them into a one-line message."""


class StdeployError(ValueError):
    """Base of every error stdeploy raises on bad input."""


class ConfigError(StdeployError):
    """A model, training, pruning or device configuration is invalid."""


class DataError(StdeployError):
    """A data set path is missing or its files are malformed."""


class CheckpointError(StdeployError):
    """A checkpoint is missing, corrupt or does not match its config."""


class ShapeError(StdeployError):
    """A tensor or graph node has the wrong shape."""


class UnsupportedPrimitive(StdeployError):
    """A module or graph node has no converter or lowering."""


class OutputMismatch(StdeployError):
    """An exported artifact or target disagrees with the PyTorch reference."""


class InactiveModel(StdeployError):
    """A spiking model's layers are silent or saturated, so spike checks and timings would mean nothing."""
