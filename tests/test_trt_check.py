"""Static TensorRT QDQ checks on a real onnxruntime-quantized 3D model and on edited copies of it."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from medptq_monai.errors import QDQCompatibilityError
from medptq_monai.export.trt_check import (
    QDQIssue,
    assert_tensorrt_compatible,
    check_qdq_for_tensorrt,
    count_float_weight_qdq,
    qdq_summary,
)

ort_quant = pytest.importorskip("onnxruntime.quantization")


class _Net(torch.nn.Module):
    """Conv3d → ReLU → ConvTranspose3d(stride 2) → Conv3d → InstanceNorm3d → Conv3d.

    The ConvTranspose has Cin=4 != Cout=6 so a per-channel axis of 0 instead of 1 shows up
    as a scale-length mismatch as well as a wrong axis.
    """

    def __init__(self) -> None:
        super().__init__()
        self.c1 = torch.nn.Conv3d(1, 4, 3, padding=1)
        self.act = torch.nn.ReLU()
        self.up = torch.nn.ConvTranspose3d(4, 6, 2, stride=2)
        self.c2 = torch.nn.Conv3d(6, 5, 3, padding=1)
        self.norm = torch.nn.InstanceNorm3d(5)
        self.c3 = torch.nn.Conv3d(5, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c3(self.norm(self.c2(self.up(self.act(self.c1(x))))))


class _Reader(ort_quant.CalibrationDataReader):
    def __init__(self, n: int = 4) -> None:
        rng = np.random.default_rng(0)
        self._it = iter([{"image": rng.standard_normal((1, 1, 8, 8, 8), dtype=np.float32)} for _ in range(n)])

    def get_next(self) -> dict | None:
        return next(self._it, None)


@pytest.fixture(scope="module")
def qdq_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("trt_check")
    fp32, int8 = tmp / "fp32.onnx", tmp / "int8.onnx"
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _Net().eval(),
            torch.randn(1, 1, 8, 8, 8),
            str(fp32),
            dynamo=False,
            opset_version=17,
            input_names=["image"],
            output_names=["logits"],
            dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
        )
    ort_quant.quantize_static(
        str(fp32),
        str(int8),
        _Reader(),
        quant_format=ort_quant.QuantFormat.QDQ,
        per_channel=True,
        activation_type=ort_quant.QuantType.QInt8,
        weight_type=ort_quant.QuantType.QInt8,
        op_types_to_quantize=["Conv", "ConvTranspose"],
        extra_options={
            "ActivationSymmetric": True,
            "WeightSymmetric": True,
            "QuantizeBias": False,
            "OpTypesToExcludeOutputQuantization": ["Conv", "ConvTranspose"],
        },
    )
    return int8


@pytest.fixture
def qdq(qdq_path: Path) -> onnx.ModelProto:
    """A fresh, editable copy of the real quantized model."""
    return onnx.load(str(qdq_path))


# ---------------------------------------------------------------- helpers to edit the graph
def _node(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.name == name)


def _dq_feeding(model: onnx.ModelProto, op_type: str) -> onnx.NodeProto:
    """The weight DequantizeLinear feeding the first node of ``op_type``."""
    target = next(n for n in model.graph.node if n.op_type == op_type)
    return next(n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.output[0] == target.input[1])


def _set_init(model: onnx.ModelProto, name: str, value: np.ndarray) -> None:
    inits = model.graph.initializer
    idx = next(i for i, t in enumerate(inits) if t.name == name)
    inits[idx].CopyFrom(numpy_helper.from_array(value, name))


def _get_init(model: onnx.ModelProto, name: str) -> np.ndarray:
    return numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name))


def _set_attr(node: onnx.NodeProto, name: str, value: int) -> None:
    for a in list(node.attribute):
        if a.name == name:
            node.attribute.remove(a)
    node.attribute.append(helper.make_attribute(name, value))


def _relu_out(model: onnx.ModelProto) -> str:
    return next(n for n in model.graph.node if n.op_type == "Relu").output[0]


def _activation_q(model: onnx.ModelProto, tensor: str) -> tuple[onnx.NodeProto, onnx.NodeProto]:
    q = next(n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == tensor)
    dq = next(n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == q.output[0])
    return q, dq


def _assert_flagged(model: onnx.ModelProto, node_name: str, *words: str) -> list[QDQIssue]:
    issues = check_qdq_for_tensorrt(model)
    hits = [i for i in issues if i.node == node_name]
    assert hits, f"{node_name} not reported; got {[str(i) for i in issues]}"
    for word in words:
        assert any(word.lower() in i.message.lower() for i in hits), (word, [str(i) for i in hits])
    with pytest.raises(QDQCompatibilityError) as err:
        assert_tensorrt_compatible(model, name="edited")
    assert node_name in str(err.value) and "edited" in str(err.value)
    return issues


# ---------------------------------------------------------------- the real positive case
def test_real_ort_qdq_model_is_tensorrt_compatible(qdq_path: Path, qdq: onnx.ModelProto) -> None:
    assert check_qdq_for_tensorrt(qdq) == []
    assert check_qdq_for_tensorrt(qdq_path) == []  # paths work too
    assert_tensorrt_compatible(qdq_path)
    assert count_float_weight_qdq(qdq) == 0


def test_ort_convtranspose_weight_is_per_output_channel_axis_1(qdq: onnx.ModelProto) -> None:
    dq = _dq_feeding(qdq, "ConvTranspose")
    axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
    weight = _get_init(qdq, dq.input[0])
    scale = _get_init(qdq, dq.input[1])
    assert weight.dtype == np.int8 and weight.shape == (4, 6, 2, 2, 2)
    assert axis == 1, f"onnxruntime quantized the ConvTranspose weight on axis {axis}, not 1"
    assert scale.shape == (6,)
    conv_dq = _dq_feeding(qdq, "Conv")
    assert next((a.i for a in conv_dq.attribute if a.name == "axis"), 1) == 0


def test_summary_counts(qdq: onnx.ModelProto) -> None:
    s = qdq_summary(qdq)
    assert s["quantize_linear"] == 4  # image, relu, convtranspose output, instancenorm output
    assert s["dequantize_linear"] == 8  # 4 activations + 4 weights
    assert s["int8_weight_initializers"] == 4
    assert s["per_channel_weight_dq"] == 4
    assert s["per_tensor_activation_q"] == 4
    assert s["quantized_ops"] == {"Conv": 3, "ConvTranspose": 1}


def test_issue_str() -> None:
    assert str(QDQIssue("n1", "DequantizeLinear", "bad")) == "n1 (DequantizeLinear): bad"


# ---------------------------------------------------------------- zero points
def test_nonzero_zero_point(qdq: onnx.ModelProto) -> None:
    q, dq = _activation_q(qdq, _relu_out(qdq))
    _set_init(qdq, q.input[2], np.array(3, dtype=np.int8))
    issues = _assert_flagged(qdq, q.name, "nonzero")
    assert any(i.node == dq.name for i in issues)


def test_nonzero_weight_zero_point(qdq: onnx.ModelProto) -> None:
    dq = _dq_feeding(qdq, "ConvTranspose")
    _set_init(qdq, dq.input[2], np.array([0, 0, 1, 0, 0, 0], dtype=np.int8))
    _assert_flagged(qdq, dq.name, "nonzero")


def test_uint8_zero_point(qdq: onnx.ModelProto) -> None:
    q, dq = _activation_q(qdq, "image")
    _set_init(qdq, q.input[2], np.array(0, dtype=np.uint8))
    issues = _assert_flagged(qdq, q.name, "UINT8")
    assert any(i.node == dq.name for i in issues)


@pytest.mark.parametrize("dtype", [np.int16, np.int32])
def test_wide_zero_point(qdq: onnx.ModelProto, dtype: type) -> None:
    dq = _dq_feeding(qdq, "Conv")
    _set_init(qdq, dq.input[2], np.zeros(_get_init(qdq, dq.input[2]).shape, dtype=dtype))
    _assert_flagged(qdq, dq.name, "needs INT8")


def test_missing_zero_point(qdq: onnx.ModelProto) -> None:
    q, dq = _activation_q(qdq, "image")
    del dq.input[2]
    _assert_flagged(qdq, dq.name, "no explicit zero point")
    del q.input[2]
    _assert_flagged(qdq, q.name, "uint8")


def test_zero_point_not_constant(qdq: onnx.ModelProto) -> None:
    _, dq = _activation_q(qdq, _relu_out(qdq))
    qdq.graph.input.append(helper.make_tensor_value_info("zp_in", TensorProto.INT8, []))
    dq.input[2] = "zp_in"
    _assert_flagged(qdq, dq.name, "not a constant")


# ---------------------------------------------------------------- bias, dtypes
def test_int32_bias_dq(qdq: onnx.ModelProto) -> None:
    conv = _node(qdq, "/c1/Conv")
    bias = _get_init(qdq, conv.input[2])
    scale = np.full(bias.shape, 1e-4, dtype=np.float32)
    qdq.graph.initializer.extend(
        [
            numpy_helper.from_array(np.round(bias / scale).astype(np.int32), "c1.bias_quantized"),
            numpy_helper.from_array(scale, "c1.bias_scale"),
            numpy_helper.from_array(np.zeros(bias.shape, np.int32), "c1.bias_zp"),
        ]
    )
    dq = helper.make_node(
        "DequantizeLinear", ["c1.bias_quantized", "c1.bias_scale", "c1.bias_zp"], ["c1.bias_dq"],
        name="c1.bias_DequantizeLinear", axis=0,
    )
    qdq.graph.node.insert(0, dq)
    conv.input[2] = "c1.bias_dq"
    _assert_flagged(qdq, "c1.bias_DequantizeLinear", "INT32")


def test_uint8_weight_initializer(qdq: onnx.ModelProto) -> None:
    dq = _dq_feeding(qdq, "Conv")
    w = _get_init(qdq, dq.input[0])
    _set_init(qdq, dq.input[0], (w.astype(np.int16) + 128).astype(np.uint8))
    _set_init(qdq, dq.input[2], np.zeros(_get_init(qdq, dq.input[2]).shape, np.uint8))
    _assert_flagged(qdq, dq.name, "weight initializer")


# ---------------------------------------------------------------- scales
def test_per_channel_activation_scale(qdq: onnx.ModelProto) -> None:
    q, dq = _activation_q(qdq, _relu_out(qdq))
    s = float(_get_init(qdq, q.input[1]))
    _set_init(qdq, q.input[1], np.full(4, s, np.float32))
    _set_init(qdq, q.input[2], np.zeros(4, np.int8))
    for node in (q, dq):
        _set_attr(node, "axis", 1)
    issues = _assert_flagged(qdq, q.name, "per-tensor")
    assert any(i.node == dq.name and "per-tensor" in i.message for i in issues)


@pytest.mark.parametrize("bad", [0.0, -0.5, np.nan, np.inf])
def test_non_positive_or_non_finite_scale(qdq: onnx.ModelProto, bad: float) -> None:
    dq = _dq_feeding(qdq, "Conv")
    scale = _get_init(qdq, dq.input[1]).copy()
    scale[0] = bad
    _set_init(qdq, dq.input[1], scale)
    _assert_flagged(qdq, dq.name, "non-")


def test_scale_not_constant(qdq: onnx.ModelProto) -> None:
    q, _ = _activation_q(qdq, "image")
    qdq.graph.input.append(helper.make_tensor_value_info("scale_in", TensorProto.FLOAT, []))
    q.input[1] = "scale_in"
    _assert_flagged(qdq, q.name, "not a constant")


def test_constant_node_scale_and_zero_point_accepted(qdq: onnx.ModelProto) -> None:
    q, dq = _activation_q(qdq, "image")
    scale = _get_init(qdq, q.input[1])
    qdq.graph.node.insert(
        0, helper.make_node("Constant", [], ["image_scale_c"], value=numpy_helper.from_array(scale, "s"))
    )
    qdq.graph.node.insert(
        0, helper.make_node("Constant", [], ["image_zp_c"], value=numpy_helper.from_array(np.array(0, np.int8), "z"))
    )
    for node in (q, dq):
        node.input[1], node.input[2] = "image_scale_c", "image_zp_c"
    assert check_qdq_for_tensorrt(qdq) == []
    # a nonzero Constant zero point is read and flagged too
    qdq.graph.node[0].attribute[0].t.CopyFrom(numpy_helper.from_array(np.array(1, np.int8), "z"))
    _assert_flagged(qdq, q.name, "nonzero")


# ---------------------------------------------------------------- weight axes
def test_convtranspose_weight_on_axis_0(qdq: onnx.ModelProto) -> None:
    dq = _dq_feeding(qdq, "ConvTranspose")
    _set_attr(dq, "axis", 0)
    _assert_flagged(qdq, dq.name, "needs axis 1", "length")


def test_convtranspose_axis_0_with_matching_length(qdq: onnx.ModelProto) -> None:
    dq = _dq_feeding(qdq, "ConvTranspose")
    _set_attr(dq, "axis", 0)
    _set_init(qdq, dq.input[1], np.full(4, 0.01, np.float32))  # Cin scales: right length, wrong axis
    _set_init(qdq, dq.input[2], np.zeros(4, np.int8))
    issues = _assert_flagged(qdq, dq.name, "needs axis 1")
    assert not any("length" in i.message for i in issues if i.node == dq.name)


def test_conv_weight_on_wrong_axis(qdq: onnx.ModelProto) -> None:
    dq = _dq_feeding(qdq, "Conv")
    _set_attr(dq, "axis", 1)
    _assert_flagged(qdq, dq.name, "needs axis 0")


def test_wrong_weight_scale_length(qdq: onnx.ModelProto) -> None:
    dq = _dq_feeding(qdq, "Conv")
    _set_init(qdq, dq.input[1], _get_init(qdq, dq.input[1])[:3].copy())
    _set_init(qdq, dq.input[2], np.zeros(3, np.int8))
    _assert_flagged(qdq, dq.name, "length 3")


def test_per_tensor_weight_allowed(qdq: onnx.ModelProto) -> None:
    dq = _dq_feeding(qdq, "ConvTranspose")
    _set_init(qdq, dq.input[1], np.array(0.02, np.float32))
    _set_init(qdq, dq.input[2], np.array(0, np.int8))
    assert check_qdq_for_tensorrt(qdq) == []


# ---------------------------------------------------------------- structure, attributes, opset
def test_quantize_not_followed_by_dequantize(qdq: onnx.ModelProto) -> None:
    q, _ = _activation_q(qdq, "image")
    _node(qdq, "/c1/Conv").input[0] = q.output[0]
    _assert_flagged(qdq, q.name, "followed by DequantizeLinear")


def test_blockwise_attribute(qdq: onnx.ModelProto) -> None:
    dq = _dq_feeding(qdq, "Conv")
    _set_attr(dq, "block_size", 2)
    _assert_flagged(qdq, dq.name, "blockwise")


def test_non_default_domain(qdq: onnx.ModelProto) -> None:
    _, dq = _activation_q(qdq, "image")
    dq.domain = "com.microsoft"
    _assert_flagged(qdq, dq.name, "com.microsoft")


def test_old_opset(qdq: onnx.ModelProto) -> None:
    for op in qdq.opset_import:
        if op.domain in ("", "ai.onnx"):
            op.version = 10
    _assert_flagged(qdq, "<graph>", "opset 10")


# ---------------------------------------------------------------- tiny graphs: MatMul / Gemm / float weights
def _tiny(op: str, w: np.ndarray, scale: np.ndarray, axis: int, **attrs: int) -> onnx.ModelProto:
    k = w.shape[1] if op == "Gemm" and attrs.get("transB") else w.shape[0]
    inits = [
        numpy_helper.from_array(w, "w"),
        numpy_helper.from_array(scale, "w_scale"),
        numpy_helper.from_array(np.zeros(scale.shape, np.int8), "w_zp"),
    ]
    nodes = [helper.make_node("DequantizeLinear", ["w", "w_scale", "w_zp"], ["w_dq"], name="w_dq", axis=axis)]
    if w.dtype != np.int8:  # float weights kept as Q→DQ
        nodes.insert(0, helper.make_node("QuantizeLinear", ["w", "w_scale", "w_zp"], ["w_q"], name="w_q", axis=axis))
        nodes[1].input[0] = "w_q"
    nodes.append(helper.make_node(op, ["x", "w_dq"], ["y"], name="op", **attrs))
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_matmul_weight_axes() -> None:
    w = np.ones((3, 5), np.int8)  # [K, N]
    assert check_qdq_for_tensorrt(_tiny("MatMul", w, np.full(5, 0.1, np.float32), axis=1)) == []
    assert check_qdq_for_tensorrt(_tiny("MatMul", w, np.full(5, 0.1, np.float32), axis=-1)) == []
    assert check_qdq_for_tensorrt(_tiny("MatMul", w, np.array(0.1, np.float32), axis=1)) == []
    _assert_flagged(_tiny("MatMul", w, np.full(3, 0.1, np.float32), axis=0), "w_dq", "needs axis 1")


def test_gemm_respects_transb() -> None:
    w = np.ones((5, 3), np.int8)  # transB=1: [N, K]
    assert check_qdq_for_tensorrt(_tiny("Gemm", w, np.full(5, 0.1, np.float32), axis=0, transB=1)) == []
    _assert_flagged(_tiny("Gemm", w, np.full(3, 0.1, np.float32), axis=1, transB=1), "w_dq", "needs axis 0")
    w = np.ones((3, 5), np.int8)  # transB=0: [K, N]
    assert check_qdq_for_tensorrt(_tiny("Gemm", w, np.full(5, 0.1, np.float32), axis=1)) == []
    _assert_flagged(_tiny("Gemm", w, np.full(3, 0.1, np.float32), axis=0), "w_dq", "needs axis 1")


def test_float_weight_qdq_is_counted_not_flagged() -> None:
    model = _tiny("MatMul", np.ones((3, 5), np.float32), np.full(5, 0.1, np.float32), axis=1)
    assert check_qdq_for_tensorrt(model) == []
    assert count_float_weight_qdq(model) == 1
    s = qdq_summary(model)
    assert s["per_channel_weight_dq"] == 1 and s["per_tensor_activation_q"] == 0
    assert s["int8_weight_initializers"] == 0 and s["quantized_ops"] == {"MatMul": 1}
    # the float-weight Q→DQ chain still has its axis checked against the consumer
    bad = _tiny("MatMul", np.ones((3, 5), np.float32), np.full(3, 0.1, np.float32), axis=0)
    _assert_flagged(bad, "w_dq", "needs axis 1")
