"""FP16 remainder of the INT8 QDQ file (``high_precision="fp16"``): float16 everywhere except int8 weights,
float32 graph I/O behind Casts, float16 Q/DQ scales at opset 19, schema-fixed float32 inputs kept, the static
TensorRT check clean, numerics on the CPU engines close to the INT8+FP32 file; bad input refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from medptq_monai.calibrate.quantize import QuantizeOptions, apply_tensorrt_variants_file, quantize_onnx
from medptq_monai.errors import CalibrationError, ModelFileError, UnknownNameError
from medptq_monai.export.fp16_remainder import FP16_OPSET, convert_remainder_fp16, convert_remainder_fp16_file
from medptq_monai.export.onnx_model import metadata
from medptq_monai.export.torch_export import export_fp32
from medptq_monai.export.trt_check import check_qdq_for_tensorrt
from medptq_monai.fileio import sha256_file
from medptq_monai.metrics import sqnr_db

from conftest import ct_patches


class _Net(torch.nn.Module):
    """Conv → InstanceNorm → LeakyReLU → residual Add → ConvTranspose(k2 s2) → trilinear Upsample (Resize with
    float32 scales) → Conv → Softmax: every kind of op the FP16 remainder has to type."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = torch.nn.Conv3d(1, 8, 3, stride=2, padding=1)
        self.norm = torch.nn.InstanceNorm3d(8, affine=True)
        self.act = torch.nn.LeakyReLU(0.01)
        self.c2 = torch.nn.Conv3d(8, 8, 3, padding=1)
        self.up = torch.nn.ConvTranspose3d(8, 4, 2, stride=2)
        self.resize = torch.nn.Upsample(scale_factor=0.5, mode="trilinear")
        self.up2 = torch.nn.Upsample(scale_factor=2.0, mode="trilinear")
        self.head = torch.nn.Conv3d(4, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.norm(self.c1(x)))
        h = h + self.c2(h)
        return torch.softmax(self.head(self.up2(self.resize(self.up(h)))), dim=1) * 10.0


@pytest.fixture(scope="module")
def fp32_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    return export_fp32(_Net(), tmp_path_factory.mktemp("fp16") / "fp32.onnx", 1, (32, 32, 32))


@pytest.fixture(scope="module")
def int8_path(fp32_path: Path) -> Path:
    out = fp32_path.with_name("int8.onnx")
    quantize_onnx(fp32_path, out, ct_patches(4), QuantizeOptions(calibrator="max"))
    return out


@pytest.fixture(scope="module")
def fp16_path(fp32_path: Path) -> Path:
    out = fp32_path.with_name("int8_fp16.onnx")
    quantize_onnx(fp32_path, out, ct_patches(4), QuantizeOptions(calibrator="max", high_precision="fp16"))
    return out


def _ort(path: Path, x: np.ndarray) -> np.ndarray:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]


def test_remainder_is_float16_with_float32_io(fp16_path: Path) -> None:
    model = onnx.load(str(fp16_path))
    onnx.checker.check_model(model, full_check=True)
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) == FP16_OPSET
    g = model.graph
    assert [i.type.tensor_type.elem_type for i in (*g.input, *g.output)] == [TensorProto.FLOAT] * 2
    assert g.node[0].op_type == "Cast" and g.node[-1].op_type == "Cast"
    inits = {t.name: t for t in g.initializer}
    consts = {**inits, **{n.output[0]: n.attribute[0].t for n in g.node if n.op_type == "Constant"}}
    resize_scales = {n.input[2] for n in g.node if n.op_type == "Resize"}
    float32 = {name for name, t in consts.items() if t.data_type == TensorProto.FLOAT}
    assert float32 == resize_scales  # only what Resize's schema fixes to float32 (its scales)
    assert TensorProto.FLOAT16 in {t.data_type for t in consts.values()}
    assert {t.data_type for t in g.initializer} <= {TensorProto.FLOAT16, TensorProto.FLOAT, TensorProto.INT8,
                                                     TensorProto.INT64}
    scales = {n.input[1] for n in g.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")}
    assert scales and all(inits[s].data_type == TensorProto.FLOAT16 for s in scales)
    weights = [n for n in g.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    assert weights and all(inits[n.input[0]].data_type == TensorProto.INT8 for n in weights)
    # every value between the two I/O Casts is float16 (or int8/int64), by ONNX's strict type inference
    typed = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    floats = {vi.name: vi.type.tensor_type.elem_type for vi in typed.graph.value_info}
    assert TensorProto.FLOAT not in {t for name, t in floats.items() if name not in resize_scales}
    assert check_qdq_for_tensorrt(model) == []
    meta = metadata(model)
    assert meta["medptq.high_precision"] == "fp16" and meta["medptq.precision"] == "int8"
    assert meta["medptq.fp16_opset"] == f"17->{FP16_OPSET}"


def test_numerics_on_cpu_engines(fp32_path: Path, int8_path: Path, fp16_path: Path) -> None:
    """ONNX Runtime (float16 kernels or its own fp32 casts) and OpenVINO (float16 read, computed in f32)."""
    x = np.concatenate(ct_patches(2, seed=11))
    ref, int8 = _ort(fp32_path, x), _ort(int8_path, x)
    fp16 = _ort(fp16_path, x)
    assert fp16.dtype == np.float32 and fp16.shape == ref.shape
    assert sqnr_db(int8, fp16) > 25.0  # FP16 remainder vs the INT8+FP32 file
    assert sqnr_db(ref, fp16) > sqnr_db(ref, int8) - 3.0
    ov = pytest.importorskip("openvino")
    compiled = ov.Core().compile_model(str(fp16_path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    got = compiled({0: x})[0]
    assert sqnr_db(int8, got) > 25.0


def test_fp32_model_converts_too(fp32_path: Path, tmp_path: Path) -> None:
    """Without Q/DQ the same conversion is a plain FP16 model with FP32 I/O (what TensorRT fp16 builds)."""
    out = tmp_path / "fp16.onnx"
    report = convert_remainder_fp16_file(fp32_path, out)
    assert report.casts == 2 and report.initializers > 0 and report.opset_to == FP16_OPSET
    x = np.concatenate(ct_patches(1, seed=3))
    assert sqnr_db(_ort(fp32_path, x), _ort(out, x)) > 40.0


def test_bad_input(fp32_path: Path, int8_path: Path, fp16_path: Path, tmp_path: Path) -> None:
    with pytest.raises(UnknownNameError, match="high_precision"):
        QuantizeOptions(high_precision="bf16")
    with pytest.raises(ModelFileError, match="already holds float16"):
        convert_remainder_fp16_file(fp16_path, tmp_path / "twice.onnx")
    target = tmp_path / "int8.onnx"
    target.write_bytes(fp16_path.read_bytes())
    digest = sha256_file(target)
    with pytest.raises(CalibrationError, match="already carries"):
        apply_tensorrt_variants_file(target, high_precision="fp16")
    assert sha256_file(target) == digest
    # a scale float16 cannot hold (underflows to 0): refused, nothing written
    model = onnx.load(str(int8_path))
    dq = next(n for n in model.graph.node if n.op_type == "DequantizeLinear")
    for i, t in enumerate(model.graph.initializer):
        if t.name == dq.input[1]:
            model.graph.initializer[i].CopyFrom(
                numpy_helper.from_array(np.full(numpy_helper.to_array(t).shape, 1e-9, np.float32), t.name))
    with pytest.raises(ModelFileError, match="underflows"):
        convert_remainder_fp16(model)
    # graph I/O that is not float32
    g = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.INT64, [2])],
                          [helper.make_tensor_value_info("y", TensorProto.INT64, [2])])
    with pytest.raises(ModelFileError, match="not float32"):
        convert_remainder_fp16(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))
    with pytest.raises(ModelFileError, match="not found"):
        convert_remainder_fp16_file(tmp_path / "missing.onnx", tmp_path / "out.onnx")
    assert not (tmp_path / "twice.onnx").exists() and not (tmp_path / "out.onnx").exists()


def test_file_variant_applies_both(fp32_path: Path, int8_path: Path, tmp_path: Path) -> None:
    target = tmp_path / "both.onnx"
    meta = apply_tensorrt_variants_file(int8_path, "fp16", True, fp32_path, out_path=target)
    assert meta["medptq.high_precision"] == "fp16" and meta["medptq.deconv_rewritten"] == "1"
    model = onnx.load(str(target))
    assert "ConvTranspose" not in {n.op_type for n in model.graph.node}
    assert check_qdq_for_tensorrt(model) == []
    x = np.concatenate(ct_patches(1, seed=5))
    assert sqnr_db(_ort(int8_path, x), _ort(target, x)) > 20.0
