"""Static TensorRT QDQ checks on a real 3D model quantized by this package (and by onnxruntime's defaults),
and on edited copies of it: every rule has a graph that breaks it and the allowed case next to it."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from medptq_monai.calibrate.quantize import QuantizeOptions, quantize_onnx
from medptq_monai.errors import QDQCompatibilityError
from medptq_monai.export.trt_check import (
    MAX_OPSET,
    MIN_OPSET,
    QDQIssue,
    assert_tensorrt_compatible,
    check_qdq_for_tensorrt,
    count_float_weight_qdq,
    qdq_summary,
)

ort_quant = pytest.importorskip("onnxruntime.quantization")


class _Net(torch.nn.Module):
    """Conv3d → ReLU → ConvTranspose3d(stride 2) → Conv3d → InstanceNorm3d → Conv3d.

    The ConvTranspose has Cin=4 != Cout=6, so per-channel scales on its two candidate axes differ in length.
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


def _patches(n: int = 4) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.standard_normal((1, 1, 8, 8, 8), dtype=np.float32) for _ in range(n)]


class _Reader(ort_quant.CalibrationDataReader):
    def __init__(self) -> None:
        self._it = iter([{"image": p} for p in _patches()])

    def get_next(self) -> dict | None:
        return next(self._it, None)


@pytest.fixture(scope="module")
def fp32_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    fp32 = tmp_path_factory.mktemp("trt_check") / "fp32.onnx"
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
    return fp32


@pytest.fixture(scope="module")
def qdq_path(fp32_path: Path) -> Path:
    """The model as this package quantizes it (calibrate.quantize.quantize_onnx)."""
    int8 = fp32_path.with_name("int8.onnx")
    quantize_onnx(fp32_path, int8, _patches(), QuantizeOptions(calibrator="max"))
    return int8


@pytest.fixture(scope="module")
def ort_default_path(fp32_path: Path) -> Path:
    """The same model through onnxruntime's quantize_static with its own per-channel defaults."""
    int8 = fp32_path.with_name("int8_ort_default.onnx")
    ort_quant.quantize_static(
        str(fp32_path),
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


def test_convtranspose_weight_is_per_tensor_and_conv_weights_per_output_channel(qdq: onnx.ModelProto) -> None:
    dq = _dq_feeding(qdq, "ConvTranspose")
    assert _get_init(qdq, dq.input[0]).dtype == np.int8 and _get_init(qdq, dq.input[0]).shape == (4, 6, 2, 2, 2)
    assert _get_init(qdq, dq.input[1]).shape == () and _get_init(qdq, dq.input[2]).shape == ()
    for conv in (n for n in qdq.graph.node if n.op_type == "Conv"):
        conv_dq = next(n for n in qdq.graph.node if n.output and n.output[0] == conv.input[1])
        assert [a.i for a in conv_dq.attribute if a.name == "axis"] == [0]  # explicit, output channels
        assert _get_init(qdq, conv_dq.input[1]).shape == (_get_init(qdq, conv_dq.input[0]).shape[0],)


def test_onnxruntime_default_convtranspose_axis_is_flagged(ort_default_path: Path) -> None:
    """onnxruntime's own per-channel default puts ConvTranspose weights on axis 1: the only issue found."""
    model = onnx.load(str(ort_default_path))
    dq = _dq_feeding(model, "ConvTranspose")
    assert [a.i for a in dq.attribute if a.name == "axis"] == [1]
    issues = _assert_flagged(model, dq.name, "ConvTranspose", "not settled", "per-tensor")
    assert {i.node for i in issues} == {dq.name}, [str(i) for i in issues]


def test_summary_counts(qdq: onnx.ModelProto) -> None:
    s = qdq_summary(qdq)
    assert s["quantize_linear"] == 4  # image, relu, convtranspose output, instancenorm output
    assert s["dequantize_linear"] == 8  # 4 activations + 4 weights
    assert s["int8_weight_initializers"] == 4
    assert s["per_channel_weight_dq"] == 3  # the three Conv weights; the ConvTranspose weight is per tensor
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
    dq = _dq_feeding(qdq, "Conv")
    zp = np.zeros(_get_init(qdq, dq.input[2]).shape, dtype=np.int8)
    zp[1] = 1
    _set_init(qdq, dq.input[2], zp)
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


def test_missing_zero_point_on_int8_dequantize_is_allowed(qdq: onnx.ModelProto) -> None:
    """TensorRT 10's parser and IDequantizeLayer take an absent zero point as 0, as ONNX does for int8 input."""
    _, act_dq = _activation_q(qdq, "image")
    del act_dq.input[2]  # input: a Q with an int8 zero point
    for op in ("Conv", "ConvTranspose"):  # input: an int8 weight initializer (per channel / per tensor)
        del _dq_feeding(qdq, op).input[2]
    assert check_qdq_for_tensorrt(qdq) == []


def test_missing_zero_point_on_quantize_is_flagged(qdq: onnx.ModelProto) -> None:
    """Without a zero point ONNX quantizes to uint8 and TensorRT to int8: the two disagree."""
    q, dq = _activation_q(qdq, "image")
    del q.input[2]
    del dq.input[2]
    issues = _assert_flagged(qdq, q.name, "uint8", "no zero point")
    assert any(i.node == dq.name and "UINT8" in i.message for i in issues)  # the DQ now reads uint8
    # an explicit int8 output_dtype (opset 21) settles it: the Q node itself is then fine
    _set_attr(q, "output_dtype", TensorProto.INT8)
    assert not [i for i in check_qdq_for_tensorrt(qdq) if i.node in (q.name, dq.name)]


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
@pytest.mark.parametrize("axis, channels", [(0, 4), (1, 6)])  # Cin, Cout of the (4, 6, 2, 2, 2) weight
def test_per_channel_convtranspose_weight_is_flagged_on_either_axis(qdq: onnx.ModelProto, axis: int,
                                                                    channels: int) -> None:
    dq = _dq_feeding(qdq, "ConvTranspose")
    _set_attr(dq, "axis", axis)
    _set_init(qdq, dq.input[1], np.full(channels, 0.01, np.float32))  # right length for that axis
    _set_init(qdq, dq.input[2], np.zeros(channels, np.int8))
    issues = _assert_flagged(qdq, dq.name, "not settled", "per-tensor")
    assert not any("length" in i.message for i in issues if i.node == dq.name)


def test_per_channel_weight_without_explicit_axis(qdq: onnx.ModelProto) -> None:
    """An absent axis is read as 0 by TensorRT 8.x parsers and as 1 by 10.x: it must be written out."""
    dq = _dq_feeding(qdq, "Conv")
    assert [a.i for a in dq.attribute if a.name == "axis"] == [0]
    for a in list(dq.attribute):
        if a.name == "axis":
            dq.attribute.remove(a)
    _assert_flagged(qdq, dq.name, "explicit axis")
    _set_attr(dq, "axis", 0)
    assert check_qdq_for_tensorrt(qdq) == []


def test_per_tensor_qdq_needs_no_axis(qdq: onnx.ModelProto) -> None:
    q, dq = _activation_q(qdq, "image")
    ct_dq = _dq_feeding(qdq, "ConvTranspose")
    assert not any(a.name == "axis" for n in (q, dq, ct_dq) for a in n.attribute)
    assert check_qdq_for_tensorrt(qdq) == []


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
    dq = _dq_feeding(qdq, "Conv")
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


def _set_opset(model: onnx.ModelProto, version: int) -> None:
    for op in model.opset_import:
        if op.domain in ("", "ai.onnx"):
            op.version = version


def test_old_opset(qdq: onnx.ModelProto) -> None:
    _set_opset(qdq, MIN_OPSET - 1)
    _assert_flagged(qdq, "<graph>", f"opset {MIN_OPSET - 1}")
    _set_opset(qdq, MIN_OPSET)
    assert check_qdq_for_tensorrt(qdq) == []


def test_opset_above_the_parser_range(qdq: onnx.ModelProto) -> None:
    _set_opset(qdq, MAX_OPSET + 1)
    _assert_flagged(qdq, "<graph>", f"opset {MAX_OPSET + 1}", "TensorRT 10.0")
    _set_opset(qdq, MAX_OPSET)
    assert check_qdq_for_tensorrt(qdq) == []


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


# ---------------------------------------------------------------- [TYPED] strongly typed dtype rules (FP16 remainder)
@pytest.fixture
def fp16(qdq: onnx.ModelProto) -> onnx.ModelProto:
    """The real quantized model with its FP16 remainder (export/fp16_remainder.py): the allowed case."""
    from medptq_monai.export.fp16_remainder import convert_remainder_fp16

    model, _ = convert_remainder_fp16(qdq)
    del model.graph.value_info[:]  # the checker infers types itself
    return model


def test_fp16_remainder_is_allowed(fp16: onnx.ModelProto) -> None:
    assert check_qdq_for_tensorrt(fp16) == []
    assert qdq_summary(fp16)["quantized_ops"] == {"Conv": 3, "ConvTranspose": 1}


def test_float32_bias_in_a_float16_graph_is_flagged(fp16: onnx.ModelProto) -> None:
    conv = _node(fp16, "/c1/Conv")
    _set_init(fp16, conv.input[2], _get_init(fp16, conv.input[2]).astype(np.float32))
    _assert_flagged(fp16, "/c1/Conv", "mix dtypes", "Cast")
    _set_init(fp16, conv.input[2], _get_init(fp16, conv.input[2]).astype(np.float16))  # allowed again
    assert check_qdq_for_tensorrt(fp16) == []


def test_float32_op_fed_by_float16_without_cast_is_flagged(fp16: onnx.ModelProto) -> None:
    """A float32 constant into the float16 residual chain: TensorRT's strongly typed Add takes one dtype."""
    norm = next(n for n in fp16.graph.node if n.op_type == "InstanceNormalization")
    fp16.graph.initializer.append(numpy_helper.from_array(np.array(0.5, np.float32), "half_f32"))
    add = helper.make_node("Add", [norm.output[0], "half_f32"], ["shifted"], name="shift/Add")
    idx = list(fp16.graph.node).index(norm)
    fp16.graph.node.insert(idx + 1, add)
    for n in fp16.graph.node[idx + 2:]:
        for i, name in enumerate(n.input):
            if name == norm.output[0]:
                n.input[i] = "shifted"
    _assert_flagged(fp16, "shift/Add", "mix dtypes")
    cast = helper.make_node("Cast", ["half_f32"], ["half_f16"], to=TensorProto.FLOAT16, name="half/Cast")
    fp16.graph.node.insert(idx + 1, cast)
    add.input[1] = "half_f16"
    _node(fp16, "shift/Add").input[1] = "half_f16"
    assert check_qdq_for_tensorrt(fp16) == []  # with the Cast


def test_quantize_scale_dtype_must_match_its_input(fp16: onnx.ModelProto) -> None:
    q, dq = _activation_q(fp16, _relu_out(fp16))
    scale = _get_init(fp16, q.input[1])
    fp16.graph.initializer.append(numpy_helper.from_array(scale.astype(np.float32), "relu_scale_f32"))
    q.input[1] = "relu_scale_f32"  # the DQ keeps its float16 scale
    _assert_flagged(fp16, q.name, "scale and input dtypes differ")
    q.input[1] = dq.input[1]
    assert check_qdq_for_tensorrt(fp16) == []


def test_float16_scales_need_opset_19(fp16: onnx.ModelProto) -> None:
    _set_opset(fp16, 17)
    q, _ = _activation_q(fp16, _relu_out(fp16))
    _assert_flagged(fp16, q.name, "opset 19")
    _set_opset(fp16, 19)
    assert check_qdq_for_tensorrt(fp16) == []


def _resize(scales_dtype: type) -> onnx.ModelProto:
    """float16 data through Resize, whose ``scales`` input the ONNX schema fixes to float32."""
    graph = helper.make_graph(
        [helper.make_node("Cast", ["x"], ["x16"], to=TensorProto.FLOAT16, name="in/Cast"),
         helper.make_node("Resize", ["x16", "", "scales"], ["y16"], mode="linear", name="up/Resize"),
         helper.make_node("Cast", ["y16"], ["y"], to=TensorProto.FLOAT, name="out/Cast")],
        "resize",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.array([1, 1, 2, 2, 2], scales_dtype), "scales")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])


def test_schema_fixed_float32_input_fed_float16_is_flagged() -> None:
    _assert_flagged(_resize(np.float16), "up/Resize", "needs tensor(float)")
    assert check_qdq_for_tensorrt(_resize(np.float32)) == []
