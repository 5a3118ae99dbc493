"""ONNX Runtime engine (CPU; CUDA execution provider when present and asked for)."""

from __future__ import annotations

import os
from dataclasses import replace

import onnx
import onnxruntime as ort
import torch

from ..errors import ModelFileError
from .base import Engine
from .cpu_isa import accumulates_in_32_bits, engine_isa
from .ort_fused import OrtFusion, describe_fusion, make_ort_fused
from .ort_output_quantizers import add_output_quantizers, read_output_quantizers
from .saturation import SaturationFix, describe_fix, make_saturation_safe

# Ops ONNX Runtime's CPU provider runs with integer kernels in our QDQ files: DQ→MatMul fuses into
# MatMulIntegerToFloat; a QDQ Conv without an output Q runs in float (FusedConv), so it cannot saturate.
INTEGER_OPS = ("MatMul", "Gemm")


def cpu_int8_copy(model: onnx.ModelProto, isa: str) -> tuple[SaturationFix, OrtFusion]:
    """Rewrite a QDQ ``model`` in place into what the CPU engine runs on ``isa``: saturation-safe where INT8 sums
    are 16-bit (and then no convolution fused, no output quantizer added), the ``ort_fused`` copy in every case,
    with the file's ONNX Runtime output quantizers (``ort_output_quantizers``) added first where sums are 32-bit."""
    exact_sums = accumulates_in_32_bits(isa)
    quantizers = read_output_quantizers(model)
    fix = SaturationFix(0, 0) if exact_sums else make_saturation_safe(model, INTEGER_OPS)
    added = len(add_output_quantizers(model, quantizers)) if exact_sums else 0
    return fix, replace(make_ort_fused(model, fuse=exact_sums), output_quantizers=added)


class OnnxRuntimeEngine(Engine):
    """Runs an FP32 or QDQ INT8 ONNX file with ONNX Runtime.

    On CPU, QDQ Conv is fused into integer QLinearConv only where the Q/DQ pattern allows it;
    other quantized ops run in float between Q/DQ. A QDQ model is loaded as an ORT-specific copy
    (``ort_fused``): Relu-fed output quantizers are folded into QLinearConv where that is free, the
    output quantizers the file records for ONNX Runtime (chosen under an SQNR budget at quantize time,
    ``calibrate/ort_outputs.py``) are added so that those convolutions run as QLinearConv too, and
    the weights of the convolutions it runs in float are dequantized once at load. On a CPU without
    32-bit INT8 accumulation (``cpu_isa``: MLAS follows the CPU's own flags) no convolution is fused
    and the ops it runs with integer kernels (``INTEGER_OPS``) are made saturation-safe (``saturation``).
    Measure before assuming a speedup (``scripts/ort_int8_speed.py``).
    """

    name = "onnxruntime"

    def __init__(
        self,
        model_path: str | os.PathLike,
        precision: str = "int8",
        device: str | torch.device = "cpu",
        threads: int | None = None,
    ) -> None:
        super().__init__(model_path, precision, device)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = int(threads)
        providers = ["CPUExecutionProvider"]
        if self.device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": self.device.index or 0}))
        self.isa = engine_isa(self.name)
        self.saturation = SaturationFix(0, 0)
        self.fusion = OrtFusion(0, 0)
        try:
            source: str | bytes = str(self.model_path)
            if precision == "int8" and self.device.type == "cpu":
                proto = onnx.load(str(self.model_path))
                if any(n.op_type == "QuantizeLinear" for n in proto.graph.node):
                    self.saturation, self.fusion = cpu_int8_copy(proto, self.isa)
                    source = proto.SerializeToString()
            self.session = ort.InferenceSession(source, options, providers=providers)
        except Exception as err:
            raise ModelFileError(f"ONNX Runtime cannot load {self.model_path}: {err}") from err
        self.providers = self.session.get_providers()

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        feed = self.host_batch(x)
        (out,) = self.session.run([self.spec.output_name], {self.spec.input_name: feed})
        return torch.from_numpy(out).to(self.device)

    def describe(self) -> dict[str, str]:
        info = {**super().describe(), "providers": ",".join(self.providers), "onnxruntime": ort.__version__,
                "isa": self.isa}
        if self.precision == "int8":
            info["int8_model"] = describe_fix(self.isa, self.saturation)
            info["ort_graph"] = describe_fusion(self.fusion)
        return info
