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
    """A config or spec mapping with an unknown key, a missing key, a value of the wrong type or
    out of range."""


class ModelError(MergeqError):
    """A model mergeq cannot use as given: a spec that builds nothing, weights that do not fit,
    an output with no logits, a reconstruction unit that does not map one tensor to one tensor."""


class UntrustedCodeError(CheckpointError):
    """A model file whose metadata names code to run (a ``builder``): mergeq never runs code named
    in a file unless the user asks for it (``trust_builder=True`` / ``--trust-builder``)."""


class DeviceMemoryError(MergeqError):
    """A model or batch that does not fit the GPU's free memory (what was asked, what is free)."""
