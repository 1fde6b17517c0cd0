"""Exceptions raised on bad input. Each message names the offending thing and what was expected."""


class MergeqError(ValueError):
    """Base class for mergeq's input errors."""


class BitWidthError(MergeqError):
    """A bit width outside the supported range [2, 8]."""


class IncompatibleModelsError(MergeqError):
    """Models that cannot be merged or compared (architecture, shape, bit width or grid mismatch)."""


class CalibrationDataError(MergeqError):
    """Empty, NaN or otherwise unusable calibration data."""


class CheckpointError(MergeqError):
    """A missing, truncated or corrupt checkpoint file."""


class ConfigError(MergeqError):
    """A config key that is unknown, of the wrong type or out of range."""
