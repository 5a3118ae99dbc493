"""The engine registry: one ``EngineSpec`` per backend, looked up by name everywhere.

Adding an engine is one ``Engine`` subclass and one ``register_engine`` call below: ``create_engine``,
``auto`` selection, the benchmark rows, CLI and bundle validation all read this table. The class
is imported only when the engine is built, so a missing optional runtime costs nothing until used.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass

from ..errors import UnknownNameError

AUTO = "auto"


@dataclass(frozen=True)
class EngineSpec:
    """A registered engine: where its class lives and what it runs.

    ``target`` is ``"module:Class"`` (module relative to this package); ``requires`` the import name
    of its runtime; ``cpu_rank`` its order among CPU engines for ``auto`` (None: never picked on CPU).
    """

    name: str
    label: str
    target: str
    requires: str
    devices: tuple[str, ...]
    precisions: tuple[str, ...]
    cpu_rank: int | None = None

    def installed(self) -> bool:
        """True when the runtime package can be imported (not imported here)."""
        return importlib.util.find_spec(self.requires) is not None

    def load_class(self) -> type:
        """The ``Engine`` subclass (imports its runtime)."""
        module, _, cls = self.target.partition(":")
        return getattr(importlib.import_module(module, __package__), cls)


_REGISTRY: dict[str, EngineSpec] = {}


def register_engine(spec: EngineSpec) -> EngineSpec:
    """Add ``spec`` to the registry (a name registered twice is an error)."""
    if spec.name == AUTO or spec.name in _REGISTRY:
        raise ValueError(f"engine name {spec.name!r} is already taken")
    _REGISTRY[spec.name] = spec
    return spec


def engine_names(include_auto: bool = True) -> tuple[str, ...]:
    """Registered engine names (with ``auto`` first unless ``include_auto`` is False)."""
    return ((AUTO,) if include_auto else ()) + tuple(_REGISTRY)


def engine_spec(name: str) -> EngineSpec:
    """The spec of a registered engine, else ``UnknownNameError`` listing the registered ones."""
    if name not in _REGISTRY:
        raise UnknownNameError(f"unknown engine {name!r}; registered engines: {', '.join(engine_names())}")
    return _REGISTRY[name]


def cpu_engines() -> list[EngineSpec]:
    """Engines that ``auto`` may pick on CPU, in preference order."""
    return sorted((s for s in _REGISTRY.values() if s.cpu_rank is not None), key=lambda s: s.cpu_rank)


# OpenVINO first on CPU: it runs QDQ convolutions and deconvolutions as int8 kernels.
register_engine(EngineSpec("torch", "MONAI torch FP32 eager", ".torch_engine:TorchEngine", "torch",
                           ("cpu", "cuda"), ("fp32",)))
register_engine(EngineSpec("onnxruntime", "ONNX Runtime", ".onnxruntime_engine:OnnxRuntimeEngine", "onnxruntime",
                           ("cpu",), ("fp32", "int8"), cpu_rank=1))
register_engine(EngineSpec("openvino", "OpenVINO", ".openvino_engine:OpenVinoEngine", "openvino",
                           ("cpu",), ("fp32", "int8"), cpu_rank=0))
register_engine(EngineSpec("tensorrt", "TensorRT", ".tensorrt_engine:TensorRTEngine", "tensorrt",
                           ("cuda",), ("fp32", "fp16", "int8")))
