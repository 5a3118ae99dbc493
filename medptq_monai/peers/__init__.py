"""Other quantizers, measured beside medptq's own INT8 (``medptq bench``): NNCF on OpenVINO."""

from .nncf_peer import (
    AccuracyControlOutcome, count_int8_ops, nncf_quantize, nncf_quantize_with_accuracy_control, nncf_version, openvino_ir_bytes,
)

__all__ = ["AccuracyControlOutcome", "count_int8_ops", "nncf_quantize", "nncf_quantize_with_accuracy_control", "nncf_version",
           "openvino_ir_bytes"]
