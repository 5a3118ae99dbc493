"""One ``Engine`` interface over the registered backends (``registry``); ``create_engine`` builds one."""

from __future__ import annotations

import logging
import os

import torch

from ..errors import EngineUnavailableError, UnknownNameError
from .base import PRECISIONS, Engine, EngineContext
from .registry import AUTO, EngineSpec, cpu_engines, engine_names, engine_spec, register_engine

logger = logging.getLogger(__name__)


def check_engine_name(name: str) -> str:
    """Return ``name`` if it is ``auto`` or a registered engine, else raise ``UnknownNameError``."""
    if name != AUTO:
        engine_spec(name)
    return name


def check_precision(precision: str) -> str:
    """Return ``precision`` if known, else raise ``UnknownNameError``."""
    if precision not in PRECISIONS:
        raise UnknownNameError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    return precision


def create_engine(
    name: str,
    model_path: str | os.PathLike | None,
    precision: str = "int8",
    device: str | torch.device = "cpu",
    *,
    torch_network: torch.nn.Module | None = None,
    checkpoint: str | os.PathLike | None = None,
    in_channels: int | None = None,
    num_classes: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    threads: int | None = None,
) -> Engine:
    """Build the engine ``name`` for ``model_path`` (an ONNX file; the torch engine uses the module + checkpoint).

    ``auto`` takes TensorRT when it is usable (package + CUDA GPU), else the first installed CPU
    engine of the registry's preference order; a requested ``tensorrt`` that cannot run raises
    ``EngineUnavailableError`` with the reason.
    """
    check_engine_name(name)
    check_precision(precision)
    device = torch.device(device)
    if name == AUTO:
        from .tensorrt_engine import tensorrt_available

        usable, reason = tensorrt_available()
        if usable:
            name = "tensorrt"
        else:
            name = first_cpu_engine()
            log = logger.warning if device.type == "cuda" else logger.info
            log("engine auto: TensorRT is not usable (%s); falling back to %s on CPU", reason, name)
            device = torch.device("cpu")
    context = EngineContext(torch_network, checkpoint, in_channels, num_classes, cache_dir, threads)
    return engine_spec(name).load_class().build(model_path, precision, device, context)


def first_cpu_engine() -> str:
    """The installed CPU engine ``auto`` picks (registry preference order)."""
    for spec in cpu_engines():
        if spec.installed():
            return spec.name
    raise EngineUnavailableError("no CPU engine installed: pip install 'medptq-monai[cpu]' (openvino, onnxruntime)")


__all__ = [
    "AUTO", "Engine", "EngineContext", "EngineSpec", "check_engine_name", "check_precision", "cpu_engines",
    "create_engine", "engine_names", "engine_spec", "first_cpu_engine", "register_engine",
]
