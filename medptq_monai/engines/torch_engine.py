"""The FP32 torch reference: the bundle's ``network_def`` with ``models/model.pt`` loaded, run eagerly."""

from __future__ import annotations

import os

import torch

from ..export.onnx_model import IOSpec
from ..export.torch_export import load_checkpoint
from .base import Engine


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

    def _read_spec(self) -> IOSpec:
        return self._io

    @torch.no_grad()
    def _run(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x.to(self.device, torch.float32))
