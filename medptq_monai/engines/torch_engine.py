"""The FP32 torch reference: the bundle's ``network_def`` with ``models/model.pt`` loaded, run eagerly."""

from __future__ import annotations

import os

import torch

from ..export.onnx_model import IOSpec
from ..export.torch_export import load_checkpoint
from ..errors import UnknownNameError
from .base import Engine, EngineContext


class TorchEngine(Engine):
    """MONAI/torch eager FP32 — what users run today; the baseline for speed and fidelity.

    Any spatial size the network accepts is allowed; rank and channel count are checked.
    """

    name = "torch"

    def __init__(
        self,
        module: torch.nn.Module,
        checkpoint: str | os.PathLike | None,
        in_channels: int,
        num_classes: int,
        device: str | torch.device = "cpu",
    ) -> None:
        self._io = IOSpec("input", (None, int(in_channels), None, None, None), "output", (None, int(num_classes)))
        super().__init__(checkpoint or "<in-memory module>", "fp32", device)
        if checkpoint is not None:
            load_checkpoint(module, checkpoint)
        self.module = module.float().to(self.device).eval()

    @classmethod
    def build(cls, model_path: str | os.PathLike | None, precision: str, device: torch.device,
              context: EngineContext) -> TorchEngine:
        """The torch reference needs the module, its checkpoint and the I/O channel counts."""
        if precision != "fp32":
            raise UnknownNameError(f"the torch engine runs the FP32 checkpoint only, not {precision!r}")
        if context.torch_network is None or context.in_channels is None or context.num_classes is None:
            raise ValueError("the torch engine needs torch_network, in_channels and num_classes")
        return cls(context.torch_network, context.checkpoint, context.in_channels, context.num_classes, device)

    def _read_spec(self) -> IOSpec:
        return self._io

    @torch.no_grad()
    def _run(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x.to(self.device, torch.float32))
