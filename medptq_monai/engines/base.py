"""The one interface every inference backend implements."""

from __future__ import annotations

import abc
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import InputImageError
from ..export.onnx_model import IOSpec, io_spec, load_onnx

PRECISIONS = ("fp32", "fp16", "int8")


@dataclass(frozen=True)
class EngineContext:
    """What an engine may need besides the model file: the torch reference's module, checkpoint and
    I/O sizes, TensorRT's plan cache, and CPU runtimes' thread count (None: the runtime's default)."""

    torch_network: torch.nn.Module | None = None
    checkpoint: str | os.PathLike | None = None
    in_channels: int | None = None
    num_classes: int | None = None
    cache_dir: str | os.PathLike | None = None
    threads: int | None = None


class Engine(abc.ABC):
    """A loaded model: ``engine(x)`` maps a float batch ``[N, C, D, H, W]`` to logits ``[N, K, D, H, W]``.

    Subclasses set ``name`` and implement ``_run``; inputs are validated here against the
    model's I/O signature, and outputs come back as torch tensors on ``self.device``.
    """

    name: str = "engine"

    def __init__(self, model_path: str | os.PathLike, precision: str, device: str | torch.device = "cpu") -> None:
        self.model_path = Path(model_path)
        self.precision = precision
        self.device = torch.device(device)
        self.spec: IOSpec = self._read_spec()

    def _read_spec(self) -> IOSpec:
        return io_spec(load_onnx(self.model_path, load_weights=False))

    @classmethod
    def build(cls, model_path: str | os.PathLike | None, precision: str, device: torch.device,
              context: EngineContext) -> Engine:
        """Construct the engine from the common arguments (``create_engine`` calls this)."""
        return cls(model_path, precision, device, threads=context.threads)

    @property
    def in_channels(self) -> int | None:
        return self.spec.in_channels

    @property
    def num_classes(self) -> int | None:
        return self.spec.num_classes

    def validate(self, x: torch.Tensor) -> None:
        """Raise ``InputImageError`` if ``x`` is not a float batch matching the model input."""
        if not isinstance(x, torch.Tensor):
            raise InputImageError(f"{self.name}: expected a torch.Tensor, got {type(x).__name__}")
        if x.ndim != 5:
            raise InputImageError(f"{self.name}: expected a 5D batch [N, C, D, H, W], got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise InputImageError(f"{self.name}: expected a floating point tensor, got {x.dtype}")
        if x.shape[0] < 1:
            raise InputImageError(f"{self.name}: empty batch")
        if self.in_channels is not None and x.shape[1] != self.in_channels:
            raise InputImageError(
                f"{self.name}: model takes {self.in_channels} channel(s), got {x.shape[1]} (shape {tuple(x.shape)})"
            )
        want = self.spec.spatial_shape
        if len(want) == 3 and any(w is not None and w != g for w, g in zip(want, x.shape[2:], strict=True)):
            raise InputImageError(f"{self.name}: model takes patches of {want}, got {tuple(x.shape[2:])}")

    @staticmethod
    def host_batch(x: torch.Tensor) -> np.ndarray:
        """``x`` as a contiguous float32 numpy array on the host (for CPU runtimes)."""
        return np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.validate(x)
        return self._run(x)

    @abc.abstractmethod
    def _run(self, x: torch.Tensor) -> torch.Tensor:
        """Run a validated batch; return logits on ``self.device``."""

    def describe(self) -> dict[str, str]:
        """Name, precision, device and model file, for logs and reports."""
        return {
            "engine": self.name,
            "precision": self.precision,
            "device": str(self.device),
            "model": str(self.model_path),
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.model_path.name}, precision={self.precision}, device={self.device})"
