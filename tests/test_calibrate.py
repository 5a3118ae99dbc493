import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from medptq_monai.calibrate.calibrators import (
    CALIBRATORS,
    activation_bytes,
    collect_ranges,
    mse_threshold,
    tensor_groups,
)
from medptq_monai.calibrate.quantize import QuantizeOptions, preprocess, quantize_onnx, select_nodes
from medptq_monai.errors import CalibrationError, UnknownNameError
from medptq_monai.export.onnx_model import io_spec, metadata
from medptq_monai.export.trt_check import check_qdq_for_tensorrt, count_float_weight_qdq, qdq_summary
from medptq_monai.metrics import sqnr_db

from conftest import ct_patches


def _run(path, patches):
    """Logits of the ONNX model at ``path`` on ``patches`` (ONNX Runtime CPU)."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, {"input": p})[0] for p in patches])


def _scales(path):
    model = onnx.load(str(path))
    return {i.name: numpy_helper.to_array(i).tobytes() for i in model.graph.initializer if i.name.endswith("_scale")}


def test_fp32_export_has_dynamic_batch_and_opset(small_fp32):
    model = onnx.load(str(small_fp32))
    onnx.checker.check_model(model)
    spec = io_spec(model)
    assert spec.input_name == "input" and spec.output_name == "output"
    assert spec.input_shape == (None, 1, 32, 32, 32) and spec.num_classes == 3
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17


@pytest.mark.parametrize("calibrator", CALIBRATORS)
def test_each_calibrator_gives_a_valid_compact_trt_ready_model(small_fp32, tmp_path, calibrator):
    out = tmp_path / f"{calibrator}.onnx"
    res = quantize_onnx(small_fp32, out, ct_patches(4), QuantizeOptions(calibrator=calibrator, seed=5))
    model = onnx.load(str(out))
    onnx.checker.check_model(model)
    assert check_qdq_for_tensorrt(model) == []
    assert count_float_weight_qdq(model) == 0
    summary = qdq_summary(model)
    assert summary["quantized_ops"].get("Conv", 0) > 0 and summary["quantized_ops"].get("ConvTranspose", 0) > 0
    meta = metadata(model)
    assert meta["medptq.calibrator"] == calibrator and meta["medptq.num_patches"] == "4"
    assert meta["medptq.seed"] == "5" and len(meta["medptq.fp32_sha256"]) == 64 and "medptq.version" in meta
    assert res.num_patches == 4 and res.quantized_nodes
    # norm layers stay float: no DequantizeLinear feeds a normalisation
    norm_inputs = {i for n in model.graph.node if "Norm" in n.op_type for i in n.input}
    assert not norm_inputs & {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}


def test_same_seed_same_data_gives_bit_identical_scales(small_fp32, tmp_path):
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    for out in (a, b):
        quantize_onnx(small_fp32, out, ct_patches(4, seed=1), QuantizeOptions(calibrator="entropy", seed=1))
    sa, sb = _scales(a), _scales(b)
    assert sa and sa == sb
    c = tmp_path / "c.onnx"
    quantize_onnx(small_fp32, c, ct_patches(4, seed=2), QuantizeOptions(calibrator="entropy", seed=2))
    assert _scales(c) != sa


def test_exclusion_by_name_pattern_keeps_nodes_float(small_fp32, tmp_path):
    model = onnx.load(str(small_fp32))
    first_conv = next(n.name for n in model.graph.node if n.op_type == "Conv")
    out = tmp_path / "excl.onnx"
    res = quantize_onnx(small_fp32, out, ct_patches(2), QuantizeOptions(calibrator="max", exclude=[first_conv]))
    assert first_conv in res.excluded_nodes and first_conv not in res.quantized_nodes
    q = onnx.load(str(out))
    node = next(n for n in q.graph.node if n.name == first_conv)
    producers = {o: n.op_type for n in q.graph.node for o in n.output}
    assert producers.get(node.input[0]) != "DequantizeLinear"


def test_no_calibration_data_is_an_error(small_fp32, tmp_path):
    with pytest.raises(CalibrationError, match="no calibration data"):
        quantize_onnx(small_fp32, tmp_path / "x.onnx", [], QuantizeOptions(calibrator="max"))
    assert not (tmp_path / "x.onnx").exists()


def test_wrong_patch_shape_is_an_error(small_fp32, tmp_path):
    bad = [np.zeros((1, 1, 16, 32, 32), np.float32)]
    with pytest.raises(CalibrationError, match="shape"):
        quantize_onnx(small_fp32, tmp_path / "x.onnx", bad, QuantizeOptions(calibrator="max"))
    two_channels = [np.zeros((1, 2, 32, 32, 32), np.float32)]
    with pytest.raises(CalibrationError, match="shape"):
        quantize_onnx(small_fp32, tmp_path / "x.onnx", two_channels, QuantizeOptions(calibrator="max"))
    assert not (tmp_path / "x.onnx").exists()


def test_unknown_calibrator_is_rejected():
    with pytest.raises(UnknownNameError, match="minmax"):
        QuantizeOptions(calibrator="minmax")


def test_mse_threshold_clips_outliers_but_not_a_uniform_range():
    edges = np.linspace(0, 10, 2049, dtype=np.float32)
    uniform = np.ones(2048)
    assert mse_threshold(uniform, edges) > 9.5
    tailed = np.zeros(2048)
    tailed[:200] = 1e6  # mass below ~1.0
    tailed[-1] = 1  # one outlier at 10
    assert mse_threshold(tailed, edges) < 2.0


def test_layer_sensitivity_ranks_every_quantized_node(small_fp32, tmp_path):
    from medptq_monai.calibrate.sensitivity import layer_sensitivity

    result = layer_sensitivity(small_fp32, ct_patches(3), QuantizeOptions(calibrator="max"), eval_patches=2)
    layers = result["layers"]
    model = onnx.load(str(small_fp32))
    convs = [n for n in model.graph.node if n.op_type in ("Conv", "ConvTranspose")]
    assert len(layers) == len(convs)
    sqnr = np.array([r["sqnr_db"] for r in layers])
    assert list(sqnr) == sorted(sqnr)
    # reference 1: the INT8 file a fresh quantize_onnx writes from the same patches, on the same evaluation
    # patches, is the "all" model of the analysis (measured: equal)
    int8 = tmp_path / "int8.onnx"
    quantize_onnx(small_fp32, int8, ct_patches(3), QuantizeOptions(calibrator="max"))
    evaluation = ct_patches(3)[:2]
    assert abs(sqnr_db(_run(small_fp32, evaluation), _run(int8, evaluation)) - result["all"]) < 0.1
    # reference 2: the layers' noise powers add up to the whole model's (independent rounding noise;
    # measured 31.87 dB predicted vs 31.93 dB), so every layer is measured and none is over- or under-counted
    predicted_all = -10.0 * np.log10(np.sum(10.0 ** (-sqnr / 10.0)))
    assert abs(predicted_all - result["all"]) < 1.0, (predicted_all, result["all"])
    assert result["all"] < sqnr.min()  # quantizing everything is noisier than any one layer alone


def test_tensor_groups_respect_the_byte_budget_and_cover_every_tensor():
    sizes = {"a": 6, "b": 5, "c": 4, "d": 3, "e": 2, "huge": 50}
    groups = tensor_groups(sizes, 8)
    assert set().union(*groups) == set(sizes) and sum(len(g) for g in groups) == len(sizes)
    assert {"huge"} in groups  # larger than the budget: alone
    assert all(sum(sizes[t] for t in g) <= 8 for g in groups if g != {"huge"})
    assert len(groups) == 4  # huge | a+e | b+d | c
    assert tensor_groups(sizes, 10**6) == [set(sizes)]


@pytest.mark.parametrize("calibrator", ["mse", "entropy"])
def test_calibration_in_several_passes_gives_the_ranges_of_one_pass(small_fp32, tmp_path, calibrator):
    pre = tmp_path / "pre.onnx"
    chosen, _, tensors = select_nodes(preprocess(small_fp32, pre), QuantizeOptions())
    sizes = activation_bytes(pre, tensors, batch=1)
    assert sizes["input"] == 32**3 * 4 and min(sizes.values()) > 0
    budget = max(sizes.values())  # forces several passes
    assert len(tensor_groups(sizes, budget)) > 2
    one, n1 = collect_ranges(pre, "input", ct_patches(3), calibrator, tensors, tmp_path)
    many, n2 = collect_ranges(pre, "input", ct_patches(3), calibrator, tensors, tmp_path, max_pass_bytes=budget)
    assert n1 == n2 == 3 and set(one.keys()) == set(many.keys()) == tensors
    assert one.calibration_method == many.calibration_method
    for t in tensors:
        assert float(one[t].range_value[1]) == float(many[t].range_value[1]), t
    with pytest.raises(CalibrationError, match="max_pass_bytes"):
        collect_ranges(pre, "input", ct_patches(1), calibrator, tensors, tmp_path, max_pass_bytes=0)


def test_calibration_at_a_smaller_patch_size_applies_its_ranges_to_the_full_model(small_fp32, tmp_path):
    from medptq_monai.export.torch_export import export_fp32

    from conftest import small_unet

    calib = tmp_path / "calib16.onnx"
    export_fp32(small_unet(), calib, 1, (16, 16, 16))
    out = tmp_path / "int8.onnx"
    res = quantize_onnx(small_fp32, out, ct_patches(8, roi=(16, 16, 16)), QuantizeOptions(calibrator="max"),
                        calibration_model=calib)
    model = onnx.load(str(out))
    onnx.checker.check_model(model)
    assert io_spec(model).input_shape == (None, 1, 32, 32, 32)
    assert metadata(model)["medptq.calibration_roi"] == "16x16x16" and res.num_patches == 8
    assert check_qdq_for_tensorrt(model) == []
    full = tmp_path / "full.onnx"
    quantize_onnx(small_fp32, full, ct_patches(8), QuantizeOptions(calibrator="max"))
    # reference: quantizing the 16^3 model itself from the same patches gives exactly these scales
    direct = tmp_path / "direct16.onnx"
    quantize_onnx(calib, direct, ct_patches(8, roi=(16, 16, 16)), QuantizeOptions(calibrator="max"))
    assert _scales(out) == _scales(direct) and _scales(out).keys() == _scales(full).keys()
    # and on full-size patches it loses at most 1 dB against calibrating at the full size (measured: +0.8 dB)
    evaluation = ct_patches(4, seed=11)
    reference = _run(small_fp32, evaluation)
    small_roi_db, full_roi_db = (sqnr_db(reference, _run(m, evaluation)) for m in (out, full))
    assert small_roi_db >= full_roi_db - 1.0, (small_roi_db, full_roi_db)
    with pytest.raises(CalibrationError, match="has shape"):  # patches must match the calibration model
        quantize_onnx(small_fp32, tmp_path / "x.onnx", ct_patches(2), QuantizeOptions(calibrator="max"),
                      calibration_model=calib)


def test_a_calibration_model_with_other_inputs_is_refused(small_fp32, tmp_path):
    from monai.networks.nets import UNet

    from medptq_monai.export.torch_export import export_fp32

    two_channels = tmp_path / "two_channels.onnx"
    export_fp32(UNet(3, 2, 3, (8, 16), (2,), num_res_units=0).eval(), two_channels, 2, (16, 16, 16))
    with pytest.raises(CalibrationError, match="calibration model .* has input"):
        quantize_onnx(small_fp32, tmp_path / "x.onnx", ct_patches(2, roi=(16, 16, 16)),
                      QuantizeOptions(calibrator="max"), calibration_model=two_channels)
    assert not (tmp_path / "x.onnx").exists()
