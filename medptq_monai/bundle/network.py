"""``EngineNetwork``: an engine behind an ``nn.Module``, usable as ``network`` in any MONAI config."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import torch

from ..engines import check_engine_name, check_precision, create_engine
from ..errors import ModelFileError
from ..export.onnx_model import load_onnx

logger = logging.getLogger(__name__)

CALIBRATE_HINT = "create it with: medptq quantize <bundle> --dataset_dir <image folder>"


class EngineNetwork(torch.nn.Module):
    """Runs an INT8 (or FP32) engine inside MONAI's ``SlidingWindowInferer``/``SupervisedEvaluator``.

    The model file's input channels, patch shape and class count are checked against the
    bundle metadata before anything runs; an ``int8`` request on a model without Q/DQ nodes
    is refused (it would silently run FP32). ``engine='torch'`` runs ``torch_network`` with
    ``checkpoint`` in FP32 (the reference). Batches of any size (``sw_batch_size``) are accepted.
    """

    def __init__(
        self,
        model_file: str | os.PathLike,
        engine: str = "auto",
        precision: str = "int8",
        device: str | torch.device = "cpu",
        in_channels: int | None = None,
        num_classes: int | None = None,
        roi_size: Sequence[int] | None = None,
        torch_network: torch.nn.Module | None = None,
        checkpoint: str | os.PathLike | None = None,
        cache_dir: str | os.PathLike | None = None,
    ) -> None:
        super().__init__()
        check_engine_name(engine)
        check_precision(precision)
        if engine == "torch":
            if precision != "fp32":
                logger.warning("engine 'torch' is the FP32 reference: running FP32, not %s", precision)
        else:
            _check_model_file(model_file, precision)
        self.engine = create_engine(
            engine,
            model_file,
            precision if engine != "torch" else "fp32",
            device,
            torch_network=torch_network,
            checkpoint=checkpoint,
            in_channels=in_channels,
            num_classes=num_classes,
            cache_dir=cache_dir,
        )
        self.engine.spec.check_bundle(self.engine.model_path, in_channels, num_classes, roi_size)
        logger.info("medptq engine: %s", self.engine.describe())

    @property
    def precision(self) -> str:
        return self.engine.precision

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.engine(x).to(x.device)


def _check_model_file(model_file: str | os.PathLike, precision: str) -> None:
    if not os.path.isfile(model_file):
        raise ModelFileError(f"model file not found: {model_file}; {CALIBRATE_HINT}")
    model = load_onnx(model_file, load_weights=False)
    has_qdq = any(n.op_type == "DequantizeLinear" for n in model.graph.node)
    if precision == "int8" and not has_qdq:
        raise ModelFileError(f"{model_file} has no Q/DQ nodes: it is not an INT8 model (precision='int8')")
    if precision != "int8" and has_qdq:
        raise ModelFileError(f"{model_file} is a QDQ INT8 model but precision={precision!r} was requested")
