"""OpenVINO engine (CPU): runs QDQ ONNX as real INT8 (u8/i8 convolutions)."""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import openvino as ov
import torch

from ..errors import EngineUnavailableError, ModelFileError
from ..export.onnx_model import IOSpec
from .base import Engine
from .concat_conv import split_concat_convolutions
from .cpu_isa import accumulates_in_32_bits, engine_isa
from .saturation import SaturationFix, describe_fix, make_saturation_safe


class OpenVinoEngine(Engine):
    """Reads the ONNX file directly; Q/DQ pairs become FakeQuantize and run as int8 kernels.

    ``INFERENCE_PRECISION_HINT`` is pinned to f32 so the float parts are not silently run in
    bf16 on CPUs that support it (FP32 numbers must be FP32). One compiled model per batch
    size (static shapes are faster than a dynamic batch on CPU). Before OpenVINO reads a QDQ model:
    on an INT8 path without 32-bit accumulation (``cpu_isa``; ``ONEDNN_MAX_CPU_ISA`` counts) it is made
    saturation-safe (``saturation``), and convolutions that read a Concat are split per Concat input
    (OpenVINO computes them wrongly on its AVX2 and AVX-512 VNNI paths; AMX is right). An OpenVINO IR
    (``.xml`` + ``.bin``, e.g. NNCF's INT8) is read as it is.
    """

    name = "openvino"

    def __init__(
        self,
        model_path: str | os.PathLike,
        precision: str = "int8",
        device: str | torch.device = "cpu",
        threads: int | None = None,
    ) -> None:
        super().__init__(model_path, precision, device)
        if self.device.type != "cpu":
            raise EngineUnavailableError(f"the OpenVINO engine runs on CPU, not {self.device}")
        self.core = ov.Core()
        self.isa = engine_isa(self.name)
        self.saturation = SaturationFix(0, 0)
        try:
            self.model, self.split_convolutions = self._read(self.model_path)
        except Exception as err:
            raise ModelFileError(f"OpenVINO cannot read {self.model_path}: {err}") from err
        self.config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}
        if threads:
            self.config["INFERENCE_NUM_THREADS"] = int(threads)
        self._compiled: dict[int, ov.CompiledModel] = {}

    def _read_spec(self) -> IOSpec:
        if self.model_path.suffix != ".xml":
            return super()._read_spec()
        if not self.model_path.is_file() or not self.model_path.with_suffix(".bin").is_file():
            raise ModelFileError(f"OpenVINO IR needs {self.model_path} and its .bin beside it")
        try:
            model = ov.Core().read_model(str(self.model_path))
        except Exception as err:
            raise ModelFileError(f"OpenVINO cannot read {self.model_path}: {err}") from err
        if len(model.inputs) != 1:
            raise ModelFileError(f"expected one image input, {self.model_path} has {len(model.inputs)}")

        def dims(port: ov.Output) -> tuple[int | None, ...]:
            return tuple(d.get_length() if d.is_static else None for d in port.get_partial_shape())

        return IOSpec(model.input(0).get_any_name(), dims(model.input(0)), model.output(0).get_any_name(),
                      dims(model.output(0)))

    def _read(self, path: Path) -> tuple[ov.Model, int]:
        """Read the ONNX file; a QDQ model is made saturation-safe where needed and its Concat-fed
        convolutions are split first. An IR is read unchanged."""
        if path.suffix == ".xml":
            return self.core.read_model(str(path)), 0
        proto = onnx.load(str(path))
        split = 0
        if any(n.op_type == "QuantizeLinear" for n in proto.graph.node):
            if not accumulates_in_32_bits(self.isa):
                self.saturation = make_saturation_safe(proto)
            split = split_concat_convolutions(proto)
        if not (split or self.saturation):
            return self.core.read_model(str(path)), 0
        with tempfile.TemporaryDirectory(prefix="medptq-ov-") as tmp:
            rewritten = Path(tmp) / path.name
            onnx.save(proto, str(rewritten))
            return self.core.read_model(str(rewritten)), split

    def compiled(self, batch: int) -> ov.CompiledModel:
        """The model compiled for a static batch size (cached)."""
        if batch not in self._compiled:
            model = self.model.clone()
            shape = [batch, *[d for d in self.spec.input_shape[1:]]]
            if any(d is None for d in shape):
                raise ModelFileError(f"{self.model_path}: OpenVINO engine needs static C/D/H/W, got {shape}")
            model.reshape({self.spec.input_name: ov.PartialShape(shape)})
            self._compiled[batch] = self.core.compile_model(model, "CPU", self.config)
        return self._compiled[batch]

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        feed = self.host_batch(x)
        compiled = self.compiled(feed.shape[0])
        result = compiled({self.spec.input_name: feed})
        return torch.from_numpy(np.array(result[compiled.output(0)]))

    def runtime_precisions(self, batch: int = 1) -> Counter:
        """Counts of (layer type, runtime precision) in the compiled CPU graph, e.g. ('Convolution', 'u8')."""
        runtime = self.compiled(batch).get_runtime_model()
        counts: Counter = Counter()
        for op in runtime.get_ordered_ops():
            info = op.get_rt_info()
            counts[(info["layerType"].astype(str), info["runtimePrecision"].astype(str))] += 1
        return counts

    def describe(self) -> dict[str, str]:
        info = {**super().describe(), "openvino": ov.__version__, "isa": self.isa,
                "split_concat_convolutions": str(self.split_convolutions)}
        if self.precision == "int8":
            info["int8_model"] = describe_fix(self.isa, self.saturation)
        return info
