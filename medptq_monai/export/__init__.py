"""Export: torch → FP32 ONNX, ONNX metadata and I/O inspection, static TensorRT QDQ checks."""
