"""medptq-monai: real INT8 post-training quantization for 3D medical segmentation.

The package is laid out as the pipeline runs: ``export`` (torch → FP32 ONNX, static
TensorRT checks) → ``calibrate`` (seeded patches, streaming calibrators, QDQ INT8 ONNX)
→ ``engines`` (one interface over ONNX Runtime, OpenVINO, torch and TensorRT) →
``bundle`` (MONAI bundle components).
"""

__version__ = "0.1.0"
