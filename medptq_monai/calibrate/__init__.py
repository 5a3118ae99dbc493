"""Calibration: seeded patches from the bundle's data, streaming calibrators, QDQ INT8 ONNX."""
