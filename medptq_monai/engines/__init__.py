"""One ``Engine`` interface over ONNX Runtime, OpenVINO, torch and TensorRT; ``create_engine`` picks one."""

from __future__ import annotations

import logging
import os

import torch

from ..errors import EngineUnavailableError, UnknownNameError
from .base import PRECISIONS, Engine

ENGINES = ("auto", "onnxruntime", "openvino", "tensorrt", "torch")
# CPU order for ``auto``: OpenVINO runs QDQ convolutions as int8 kernels and measured fastest
# here (reports/benchmark.md); ONNX Runtime keeps ConvTranspose and un-fused Q/DQ in float.
CPU_PREFERENCE = ("openvino", "onnxruntime")

logger = logging.getLogger(__name__)


def check_engine_name(name: str) -> str:
    """Return ``name`` if it is a known engine, else raise ``UnknownNameError``."""
    if name not in ENGINES:
        raise UnknownNameError(f"unknown engine {name!r}; choose one of {', '.join(ENGINES)}")
    return name


def check_precision(precision: str) -> str:
    """Return ``precision`` if known, else raise ``UnknownNameError``."""
    if precision not in PRECISIONS:
        raise UnknownNameError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    return precision


def create_engine(
    name: str,
    model_path: str | os.PathLike,
    precision: str = "int8",
    device: str | torch.device = "cpu",
    *,
    torch_network: torch.nn.Module | None = None,
    checkpoint: str | os.PathLike | None = None,
    in_channels: int | None = None,
    num_classes: int | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> Engine:
    """Build the engine ``name`` for ``model_path`` (an ONNX file; the torch engine uses the module + checkpoint).

    ``auto`` takes TensorRT when it is usable (package + CUDA GPU), else the first CPU engine of
    ``CPU_PREFERENCE`` that imports; a requested ``tensorrt`` that cannot run raises
    ``EngineUnavailableError`` with the reason.
    """
    check_engine_name(name)
    check_precision(precision)
    device = torch.device(device)
    if name == "auto":
        from .tensorrt_engine import tensorrt_available

        usable, reason = tensorrt_available()
        if usable:
            name = "tensorrt"
        else:
            name = _first_cpu_engine()
            log = logger.warning if device.type == "cuda" else logger.info
            log("engine auto: TensorRT is not usable (%s); falling back to %s on CPU", reason, name)
            device = torch.device("cpu")
    if name == "torch":
        if torch_network is None or in_channels is None or num_classes is None:
            raise ValueError("the torch engine needs torch_network, in_channels and num_classes")
        from .torch_engine import TorchEngine

        return TorchEngine(torch_network, checkpoint, in_channels, num_classes, device)
    if name == "onnxruntime":
        from .onnxruntime_engine import OnnxRuntimeEngine

        return OnnxRuntimeEngine(model_path, precision, device)
    if name == "openvino":
        from .openvino_engine import OpenVinoEngine

        return OpenVinoEngine(model_path, precision, device)
    from .tensorrt_engine import TensorRTEngine

    return TensorRTEngine(model_path, precision, device if device.type == "cuda" else "cuda", cache_dir=cache_dir)


def _first_cpu_engine() -> str:
    for candidate in CPU_PREFERENCE:
        try:
            __import__(candidate)
        except ImportError:
            continue
        return candidate
    raise EngineUnavailableError("no CPU engine installed: pip install 'medptq-monai[cpu]' (openvino, onnxruntime)")


__all__ = ["CPU_PREFERENCE", "ENGINES", "Engine", "check_engine_name", "check_precision", "create_engine"]
