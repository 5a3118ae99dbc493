"""Exception types: every bad input raises one of these with a specific message."""

from __future__ import annotations


class MedPTQError(Exception):
    """Base class of all errors raised on purpose by medptq-monai."""


class InputImageError(MedPTQError, ValueError):
    """An input image is unreadable, empty, of the wrong rank/channels, or holds NaN/Inf."""


class ModelFileError(MedPTQError, ValueError):
    """A model file (ONNX, checkpoint, engine plan) is missing, corrupt or disagrees with the bundle."""


class CalibrationError(MedPTQError, ValueError):
    """Calibration cannot run: no data, wrong patch shape, unknown calibrator, ..."""


class EngineUnavailableError(MedPTQError, RuntimeError):
    """The requested engine (e.g. TensorRT) cannot run on this machine."""


class UnknownNameError(MedPTQError, ValueError):
    """An unknown engine, calibrator or precision name was given."""


class QDQCompatibilityError(MedPTQError, ValueError):
    """A QDQ ONNX graph breaks TensorRT's explicit-quantization rules."""


class BundleConfigError(MedPTQError, ValueError):
    """A bundle's configs lack an id medptq needs (``network_def``, ``inferer``, ...), or its value is unusable."""
