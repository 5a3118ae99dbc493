"""The ONNX Runtime-specific copy of a QDQ model (``engines/ort_fused``): each rewrite against ONNX Runtime
running the original graph with graph optimizations disabled, what ONNX Runtime then fuses, and the real
bundle's INT8 SQNR against OpenVINO's."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from medptq_monai.engines.cpu_isa import accumulates_in_32_bits, engine_isa
from medptq_monai.engines.onnxruntime_engine import OnnxRuntimeEngine
from medptq_monai.engines.openvino_engine import OpenVinoEngine
from medptq_monai.engines.ort_fused import (
    MIN_CHANNELS,
    dequantized,
    fold_weight_dequantize,
    fuse_relu_quantize,
    make_ort_fused,
)
from medptq_monai.metrics import sqnr_db

from conftest import DATA

EXACT_SUMS = accumulates_in_32_bits(engine_isa("onnxruntime"))
RNG_SEED = 0


def _qdq_graph(channels: int, relu_scale: float, spatial: int = 6) -> tuple[onnx.ModelProto, np.ndarray]:
    """``x → Q/DQ(s8) → Conv1 → Relu → Q/DQ(s8, relu_scale) → Conv2 → y`` plus ``Conv3`` (float output)
    added to ``y``: the U-Net pattern. Weights are int8 per output channel; returns the model and an input."""
    rng = np.random.default_rng(RNG_SEED)
    c = channels

    def weight(name: str, cout: int, cin: int) -> list[onnx.TensorProto]:
        q = rng.integers(-127, 128, (cout, cin, 3, 3, 3)).astype(np.int8)
        scale = (rng.uniform(0.5, 1.5, cout) / (127 * np.sqrt(cin * 27))).astype(np.float32)
        return [numpy_helper.from_array(q, f"{name}_q"), numpy_helper.from_array(scale, f"{name}_s"),
                numpy_helper.from_array(np.zeros(cout, np.int8), f"{name}_zp")]

    inits = [*weight("w1", c, c), *weight("w2", c, c), *weight("w3", c, c),
             numpy_helper.from_array(np.array(0.02, np.float32), "xs"),
             numpy_helper.from_array(np.array(0, np.int8), "zp8"),
             numpy_helper.from_array(np.array(relu_scale, np.float32), "rs"),
             numpy_helper.from_array(rng.normal(0, 0.1, c).astype(np.float32), "b1"),
             numpy_helper.from_array(rng.normal(0, 0.1, c).astype(np.float32), "b2")]
    conv = {"kernel_shape": [3, 3, 3], "pads": [1] * 6}
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "xs", "zp8"], ["xq"], name="x_Q"),
        helper.make_node("DequantizeLinear", ["xq", "xs", "zp8"], ["xd"], name="x_DQ"),
        *[helper.make_node("DequantizeLinear", [f"w{i}_q", f"w{i}_s", f"w{i}_zp"], [f"w{i}"], name=f"w{i}_DQ", axis=0)
          for i in (1, 2, 3)],
        helper.make_node("Conv", ["xd", "w1", "b1"], ["c1"], name="Conv1", **conv),
        helper.make_node("Relu", ["c1"], ["r1"], name="Relu1"),
        helper.make_node("QuantizeLinear", ["r1", "rs", "zp8"], ["rq"], name="r_Q"),
        helper.make_node("DequantizeLinear", ["rq", "rs", "zp8"], ["rd"], name="r_DQ"),
        helper.make_node("Conv", ["rd", "w2", "b2"], ["c2"], name="Conv2", **conv),
        helper.make_node("Conv", ["xd", "w3"], ["c3"], name="Conv3", **conv),
        helper.make_node("Add", ["c2", "c3"], ["y"], name="Add"),
    ]
    shape = [1, c, spatial, spatial, spatial]
    graph = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model, rng.normal(0, 1, shape).astype(np.float32)


def _run(model: onnx.ModelProto, x: np.ndarray, optimize: bool, outputs: list[str] | None = None,
         saved: Path | None = None) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    if saved is not None:
        options.optimized_model_filepath = str(saved)
    model = onnx.ModelProto.FromString(model.SerializeToString())
    for name in outputs or []:
        model.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})


def test_dequantized_matches_onnxruntime_bit_for_bit():
    rng = np.random.default_rng(1)
    q = rng.integers(-128, 128, (5, 4, 3, 3, 3)).astype(np.int8)
    for axis, scale in ((0, rng.uniform(1e-4, 1e-1, 5)), (1, rng.uniform(1e-4, 1e-1, 4)), (1, np.array(0.0123))):
        scale = scale.astype(np.float32)
        node = helper.make_node("DequantizeLinear", ["q", "s"], ["y"], axis=axis)
        graph = helper.make_graph([node], "dq", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                                  [numpy_helper.from_array(q, "q"), numpy_helper.from_array(scale, "s")])
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        (want,) = ort.InferenceSession(model.SerializeToString(), options,
                                       providers=["CPUExecutionProvider"]).run(None, {})
        assert np.array_equal(dequantized(q, scale, None, axis), want)


def test_folding_weights_gives_the_same_output_bit_for_bit():
    model, x = _qdq_graph(8, relu_scale=0.05)
    folded = onnx.ModelProto.FromString(model.SerializeToString())
    assert fold_weight_dequantize(folded) == 3
    assert not [n for n in folded.graph.node if n.op_type == "DequantizeLinear" and n.input[0].startswith("w")]
    (want,), (got,) = _run(model, x, optimize=False), _run(folded, x, optimize=False)
    assert np.array_equal(want, got)


def test_relu_quantizer_rewrite_is_exact_below_the_s8_cap():
    """A scale large enough that no ReLU output reaches 127·s: the u8 rewrite gives the file's values exactly
    (the s8 → u8-with-zero-point-128 change of the input quantizer is exact in any case)."""
    scale = 0.03
    model, x = _qdq_graph(MIN_CHANNELS, relu_scale=scale)
    (relu,) = _run(model, x, optimize=False, outputs=["r1"])[1:]
    assert 50 * scale < relu.max() < 127 * scale  # most of the s8 range used, none of it clipped
    fused = onnx.ModelProto.FromString(model.SerializeToString())
    assert fuse_relu_quantize(fused) == 1
    assert "Relu" not in {n.op_type for n in fused.graph.node}
    (want,), (got,) = _run(model, x, optimize=False), _run(fused, x, optimize=False)
    assert np.array_equal(want, got)


def test_relu_quantizer_rewrite_keeps_values_the_s8_cap_clipped():
    """A small scale saturates the file's s8 quantizer at 127·s; the u8 one clips at 255·s instead: the same
    where the file does not clip, and closer to the float ReLU output where it does."""
    scale = 0.004
    model, x = _qdq_graph(MIN_CHANNELS, relu_scale=scale)
    relu, want_q = _run(model, x, optimize=False, outputs=["r1", "rd"])[1:]
    fused = onnx.ModelProto.FromString(model.SerializeToString())
    assert fuse_relu_quantize(fused) == 1
    (got_q,) = _run(fused, x, optimize=False, outputs=["rd"])[1:]
    clipped = relu > 127.5 * scale
    assert 0.01 < clipped.mean() < 0.9
    assert np.array_equal(got_q[~clipped], want_q[~clipped])
    assert np.all(np.abs(got_q - relu)[clipped] < np.abs(want_q - relu)[clipped])
    assert np.array_equal(got_q, np.minimum(np.round(relu / np.float32(scale)), 255) * np.float32(scale))


def test_few_input_channels_are_not_fused():
    model, _ = _qdq_graph(MIN_CHANNELS - 1, relu_scale=1.0)
    assert fuse_relu_quantize(model) == 0
    assert fuse_relu_quantize(model, min_channels=1) == 1


def test_onnxruntime_fuses_the_copy_into_qlinearconv_within_one_step(tmp_path):
    """With graph optimizations on, ONNX Runtime turns the rewritten group into QLinearConv and dequantizes
    no weight at run time; the quantized ReLU output is the original's within one quantization step (ONNX
    Runtime rounds the bias to int32 and requantizes once)."""
    scale = 0.03
    model, x = _qdq_graph(MIN_CHANNELS, relu_scale=scale)
    original = _run(model, x, optimize=False, outputs=["rd"])
    fused = onnx.ModelProto.FromString(model.SerializeToString())
    assert make_ort_fused(fused).fused_convolutions == 1
    saved = tmp_path / "optimized.onnx"
    got = _run(fused, x, optimize=True, outputs=["rd"], saved=saved)
    ops = Counter(n.op_type for n in onnx.load(str(saved)).graph.node)
    assert ops["QLinearConv"] == 1
    weights = {i.name for i in onnx.load(str(saved)).graph.initializer if i.data_type == TensorProto.INT8}
    assert not [n for n in onnx.load(str(saved)).graph.node
                if n.op_type == "DequantizeLinear" and n.input[0] in weights]
    step = np.abs(got[1] - original[1]) / scale
    assert step.max() <= 1.0 + 1e-6 and (step > 0.5).mean() < 0.01
    assert sqnr_db(original[0], got[0]) > 40


def test_engine_loads_the_ort_copy_and_keeps_the_file(tmp_path):
    model, x = _qdq_graph(MIN_CHANNELS, relu_scale=0.03)
    path = tmp_path / "model_int8.onnx"
    onnx.save(model, str(path))
    before = path.read_bytes()
    engine = OnnxRuntimeEngine(path, "int8", threads=1)
    assert path.read_bytes() == before
    assert engine.fusion.fused_convolutions == (1 if EXACT_SUMS else 0)
    assert engine.fusion.folded_weights == 2
    assert "ORT-fused copy" in engine.describe()["ort_graph"]
    (want,) = _run(model, x, optimize=False)
    assert sqnr_db(want, engine(torch.from_numpy(x)).numpy()) > 40


def _ct_patches(n: int, roi: int = 96) -> np.ndarray:
    """``n`` HU-windowed 96³ blocks of the real abdominal CT, as [n, 1, D, H, W]."""
    arr = np.asarray(nib.load(str(DATA / "images" / "abdomen_ct.nii.gz")).dataobj, dtype=np.float32)
    arr = np.clip((arr + 175.0) / 425.0, 0.0, 1.0)
    rng = np.random.default_rng(RNG_SEED)
    starts = [[int(rng.integers(0, s - roi + 1)) for s in arr.shape] for _ in range(n)]
    return np.stack([arr[a:a + roi, b:b + roi, c:c + roi][None] for a, b, c in starts])


@pytest.mark.timeout(900)
def test_real_bundle_int8_sqnr_equals_openvino(calibrated_bundle):
    """The shipped demo U-Net, quantized: ONNX Runtime on its fused copy and OpenVINO on the file give the
    same SQNR against FP32 on real CT patches (within 0.5 dB, issue 9 point 4)."""
    models = Path(calibrated_bundle) / "models"
    ort_fp32 = OnnxRuntimeEngine(models / "model.onnx", "fp32", threads=2)
    ort_int8 = OnnxRuntimeEngine(models / "model_int8.onnx", "int8", threads=2)
    ov_int8 = OpenVinoEngine(models / "model_int8.onnx", "int8", threads=2)
    if EXACT_SUMS:
        assert ort_int8.fusion.fused_convolutions >= 3
    assert ort_int8.fusion.folded_weights > 0
    x = torch.from_numpy(_ct_patches(2))
    with torch.no_grad():
        ref = ort_fp32(x).numpy()
        got_ort, got_ov = ort_int8(x).numpy(), ov_int8(x).numpy()
    ort_db, ov_db = sqnr_db(ref, got_ort), sqnr_db(ref, got_ov)
    assert ort_db > 15, (ort_db, ov_db)
    assert abs(ort_db - ov_db) <= 0.5, (ort_db, ov_db)


def test_no_convolution_is_fused_where_int8_sums_saturate():
    """On an INT8 path with 16-bit pair sums (AVX2) a QLinearConv could saturate: the copy only folds weights."""
    from medptq_monai.engines.onnxruntime_engine import cpu_int8_copy

    model, _ = _qdq_graph(MIN_CHANNELS, relu_scale=0.03)
    for isa, fused in (("avx2", 0), ("amx", 1)):
        copy = onnx.ModelProto.FromString(model.SerializeToString())
        _, fusion = cpu_int8_copy(copy, isa)
        assert (fusion.fused_convolutions, fusion.folded_weights) == (fused, 3 - fused)
        assert ("Relu" in {n.op_type for n in copy.graph.node}) == (fused == 0)


def test_engine_loads_an_fp16_remainder_file(small_fp32, small_int8, tmp_path):
    """Folded weights keep the type DequantizeLinear gives them (float16 in an FP16-remainder file); as float32
    they made ONNX Runtime refuse the file ("Conv bound to float16 and float")."""
    from medptq_monai.calibrate.quantize import apply_tensorrt_variants_file

    from conftest import ct_patches

    path = tmp_path / "fp16.onnx"
    apply_tensorrt_variants_file(small_int8, "fp16", False, small_fp32, out_path=path)
    x = np.concatenate(ct_patches(2, seed=5))
    reference = ort.InferenceSession(str(small_fp32), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    out = OnnxRuntimeEngine(path, "int8", "cpu")(torch.from_numpy(x)).numpy()
    assert out.dtype == np.float32 and sqnr_db(reference, out) > 20
