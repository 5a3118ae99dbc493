"""Output quantizers the INT8 file records for ONNX Runtime only (``engines/ort_output_quantizers``, chosen by
``calibrate/ort_outputs``): what ONNX Runtime then fuses, InstanceNorm equalization, the SQNR budget measured
again from the written file, and bad inputs."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from medptq_monai.calibrate.ort_outputs import (
    MAX_SELECTION_RUNS, SELECTION_SAMPLES, SUMMARY_KEY, _ChannelStats, _longest_fitting,
)
from medptq_monai.calibrate.quantize import QuantizeOptions, quantize_onnx
from medptq_monai.engines.onnxruntime_engine import OnnxRuntimeEngine, cpu_int8_copy
from medptq_monai.engines.ort_output_quantizers import (
    KEY, OutputQuantizer, add_output_quantizers, output_quantizer_convs, read_output_quantizers,
)
from medptq_monai.errors import CalibrationError, ModelFileError
from medptq_monai.export.onnx_model import metadata
from medptq_monai.export.torch_export import export_fp32
from medptq_monai.metrics import sqnr_db

from conftest import ct_patches

ROI = (16, 16, 16)
CHANNELS = 32


class _Net(torch.nn.Module):
    """Conv → InstanceNorm twice (channels of very different spread), a residual Add, a 1x1x1 head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = torch.nn.Conv3d(1, CHANNELS, 3, padding=1)
        self.conv1 = torch.nn.Conv3d(CHANNELS, CHANNELS, 3, padding=1)
        self.norm1 = torch.nn.InstanceNorm3d(CHANNELS, affine=True)
        self.conv2 = torch.nn.Conv3d(CHANNELS, CHANNELS, 3, padding=1)
        self.head = torch.nn.Conv3d(CHANNELS, 3, 1)
        with torch.no_grad():  # output channels whose spreads differ 300-fold: per-tensor rounding loses the small
            self.conv1.weight.mul_(torch.logspace(0, 2.5, CHANNELS).view(-1, 1, 1, 1, 1))
            self.conv1.bias.mul_(torch.logspace(0, 2.5, CHANNELS))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x))
        h = torch.nn.functional.leaky_relu(self.norm1(self.conv1(h)), 0.01)
        return self.head(h + self.conv2(h))


@pytest.fixture(scope="module")
def fp32(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ort_outq") / "fp32.onnx"
    export_fp32(_Net().eval(), path, 1, ROI)
    return path


def _int8(fp32: Path, name: str, **options) -> Path:
    out = fp32.with_name(name)
    quantize_onnx(fp32, out, ct_patches(6, roi=ROI), QuantizeOptions(calibrator="max", **options))
    return out


def _run(model: onnx.ModelProto, x: np.ndarray, fuse: bool, saved: Path | None = None) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if fuse
                                        else ort.GraphOptimizationLevel.ORT_ENABLE_BASIC)
    if saved is not None:
        options.optimized_model_filepath = str(saved)
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def _fp32_out(fp32: Path, x: np.ndarray) -> np.ndarray:
    return _run(onnx.load(str(fp32)), x, fuse=False)


def test_the_choice_meets_its_budget_when_measured_again_from_the_written_file(fp32: Path) -> None:
    """The file records quantizers whose SQNR cost on each of the first calibration samples, measured again here
    from the written file, is within the budget, and pooled what its summary says; TensorRT's graph is
    unchanged."""
    budget = 0.25
    path = _int8(fp32, "int8.onnx", ort_output_budget_db=budget)
    model = onnx.load(str(path))
    summary = json.loads(metadata(model)[SUMMARY_KEY])
    quantizers = read_output_quantizers(model)
    assert summary["candidates"] == 2 and summary["chosen"] == len(quantizers) >= 1, summary
    samples = ct_patches(6, roi=ROI)[:SELECTION_SAMPLES]
    reference = np.concatenate([_fp32_out(fp32, x).ravel() for x in samples])
    plain = np.concatenate([_run(model, x, fuse=False).ravel() for x in samples])
    copy = onnx.load(str(path))
    assert sorted(add_output_quantizers(copy, quantizers)) == sorted(quantizers), "every recorded one applies"
    with_q = np.concatenate([_run(copy, x, fuse=False).ravel() for x in samples])
    base, got = sqnr_db(reference, plain), sqnr_db(reference, with_q)
    assert base == pytest.approx(summary["sqnr_db_file"], abs=1e-3)
    assert got == pytest.approx(summary["sqnr_db_ort"], abs=1e-3)
    assert base - got <= budget + 1e-6
    for x in samples:  # each sample within the budget, not only the pooled SQNR
        ref = _fp32_out(fp32, x)
        assert sqnr_db(ref, _run(model, x, fuse=False)) - sqnr_db(ref, _run(copy, x, fuse=False)) <= budget + 1e-6
    assert not any(n.name.endswith("/ort_output_Q") for n in model.graph.node), "the file's graph is unchanged"
    assert path.read_bytes() == _int8(fp32, "int8_again.onnx", ort_output_budget_db=budget).read_bytes()


def test_a_calibration_roi_model_gets_the_choice_measured_at_that_roi(fp32: Path) -> None:
    """Calibrated at a smaller roi (``calibration_model``, as VISTA3D does for memory), the full-size file records
    exactly the choice that quantizing the smaller export itself from the same patches records."""
    full = fp32.with_name("fp32_24.onnx")
    export_fp32(_Net().eval(), full, 1, (24, 24, 24))
    options = QuantizeOptions(calibrator="max", ort_output_budget_db=100.0)
    out = quantize_onnx(full, full.with_name("int8_24.onnx"), ct_patches(6, roi=ROI), options,
                        calibration_model=fp32).path
    own = quantize_onnx(fp32, fp32.with_name("int8_16.onnx"), ct_patches(6, roi=ROI), options).path
    chosen_full, chosen_own = (read_output_quantizers(onnx.load(str(p))) for p in (out, own))
    assert len(chosen_full) == 2 and chosen_full == chosen_own
    summary = json.loads(metadata(onnx.load(str(out)))[SUMMARY_KEY])
    assert summary["chosen"] == 2 and summary["samples"] == SELECTION_SAMPLES, summary
    copy = onnx.load(str(out))
    assert sorted(add_output_quantizers(copy, chosen_full)) == sorted(chosen_full), "they apply at 24^3"


def test_onnx_runtime_fuses_the_added_quantizers_into_qlinearconv(fp32: Path, tmp_path: Path) -> None:
    """Without them ORT runs every convolution in float; with both quantizers both run as QLinearConv, and the
    fused graph computes what the Q/DQ graph computes."""
    model = onnx.load(str(_int8(fp32, "int8_fuse.onnx", ort_output_budget_db=100.0)))
    quantizers = read_output_quantizers(model)
    assert len(quantizers) == 2 == len(output_quantizer_convs(model))
    x = ct_patches(1, seed=5, roi=ROI)[0]
    _run(model, x, fuse=True, saved=tmp_path / "before.onnx")
    add_output_quantizers(model, quantizers)
    fused = _run(model, x, fuse=True, saved=tmp_path / "after.onnx")
    ops = [Counter(n.op_type for n in onnx.load(str(tmp_path / f)).graph.node) for f in ("before.onnx", "after.onnx")]
    assert ops[0].get("QLinearConv", 0) == 0 and ops[1].get("QLinearConv", 0) == 2, ops
    assert sqnr_db(_run(model, x, fuse=False), fused) > 30.0


def test_instance_norm_equalization_keeps_small_channels(fp32: Path) -> None:
    """conv1's channels differ 300-fold in spread and InstanceNorm rescales each: one per-tensor scale without
    equalization rounds the small channels away; with it the output stays close to the Q/DQ-free file."""
    model = onnx.load(str(_int8(fp32, "int8_eq.onnx", ort_output_budget_db=100.0)))
    quantizers = read_output_quantizers(model)
    name, q = next((n, q) for n, q in quantizers.items() if q.alpha is not None)
    x = ct_patches(1, seed=7, roi=ROI)[0]
    reference = _run(model, x, fuse=False)
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output[0].name = name  # conv1's float output: the per-tensor scale that covers it
    plain = OutputQuantizer(float(np.abs(_run(probe, x, fuse=False)).max()) / 127.0)
    results = {}
    for label, chosen in (("equalized", q), ("plain", plain)):
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        assert add_output_quantizers(copy, {name: chosen}) == [name]
        results[label] = sqnr_db(reference, _run(copy, x, fuse=False))
    assert results["equalized"] > 20.0 and results["equalized"] > results["plain"] + 10.0, results


def test_a_one_sided_output_gets_an_asymmetric_range_that_covers_every_value_seen(fp32: Path) -> None:
    """conv2 (read by the residual Add, so not equalized) gets a zero point: its 256 levels span exactly the
    range its FP32 output took on the calibration patches (with 0), not a symmetric one."""
    model = onnx.load(str(_int8(fp32, "int8_asym.onnx", ort_output_budget_db=100.0)))
    name, q = next((n, q) for n, q in read_output_quantizers(model).items() if q.alpha is None)
    probe = onnx.load(str(fp32))
    probe.graph.output[0].name = name
    seen = np.concatenate([_run(probe, x, fuse=False).ravel() for x in ct_patches(6, roi=ROI)])
    low, high = min(float(seen.min()), 0.0), max(float(seen.max()), 0.0)
    assert q.zero_point != 0 and q.scale == pytest.approx((high - low) / 255.0, rel=1e-5)
    assert (-128 - q.zero_point) * q.scale <= low + q.scale and (127 - q.zero_point) * q.scale >= high - q.scale
    assert q.scale < max(-low, high) / 127.0  # finer than the symmetric scale


def test_engine_adds_them_only_where_int8_sums_are_32_bit(fp32: Path) -> None:
    """On a 16-bit-sum (AVX2) path QLinearConv would saturate: the copy then adds none."""
    path = _int8(fp32, "int8_isa.onnx", ort_output_budget_db=100.0)
    _, exact = cpu_int8_copy(onnx.load(str(path)), "amx")
    _, avx2 = cpu_int8_copy(onnx.load(str(path)), "avx2")
    assert exact.output_quantizers == 2 and avx2.output_quantizers == 0
    engine = OnnxRuntimeEngine(path, "int8")
    assert "through the file's ONNX Runtime output quantizers" in engine.describe()["ort_graph"]


def test_an_equalized_output_is_clipped_where_that_lowers_the_error() -> None:
    """InstanceNorm input with tails (Student t, 6 degrees) and channel spreads 0.5-10: the channels are scaled
    to one spread, and the clip chosen on the kept subsample is below the range and rounds the whole tensor with
    less error than the scale that covers every value; the same seed keeps the same values."""
    spread = np.array([1.0, 3.0, 10.0, 0.5], np.float32)
    y = np.random.default_rng(0).standard_t(6, size=(3, 4, 24, 24, 24)).astype(np.float32)
    y = y * spread[None, :, None, None, None] + 5.0
    stats, again = _ChannelStats(4, seed=1), _ChannelStats(4, seed=1)
    stats.add(y)
    again.add(y)
    q = stats.quantizer(1e-5)
    assert q is not None and q.alpha is not None and q == again.quantizer(1e-5)
    z = np.asarray(q.alpha)[:, None] * (np.moveaxis(y, 1, 0).reshape(4, -1) - np.asarray(q.shift)[:, None])
    full = float(np.abs(z).max()) / 127.0

    def error(scale: float) -> float:
        return float(np.mean(np.square(np.clip(np.round(z / scale), -127, 127) * scale - z)))

    assert np.allclose(np.asarray(q.alpha) * spread, 10.0, rtol=0.1)
    assert q.scale < 0.9 * full and error(q.scale) < 0.8 * error(full)


def test_the_search_skips_a_quantizer_that_does_not_fit_and_goes_on() -> None:
    """Costs add here (dB): the first and the fourth do not fit; a prefix search would stop at the first."""
    cost = {"a": 0.3, "b": 0.05, "c": 0.1, "d": 0.3, "e": 0.05, "f": 0.2}
    runs: list[list[str]] = []

    def drop(names) -> float:
        runs.append(list(names))
        return sum(cost[n] for n in names)

    assert _longest_fitting(list(cost), 0.25, drop) == ["b", "c", "e"]
    assert runs[0] == ["a"] and len(runs) <= MAX_SELECTION_RUNS - 2  # a first misfit costs one run
    runs.clear()
    many = {f"n{i:02d}": 0.01 for i in range(40)}
    cost.update(many, n00=1.0)
    taken = _longest_fitting(list(many), 0.25, drop)
    assert len(runs) == MAX_SELECTION_RUNS - 2 and "n00" not in taken and 0 < len(taken) <= 25  # capped, in budget


def test_when_not_all_fit_each_is_measured_alone_on_one_sample_first(fp32: Path, monkeypatch) -> None:
    """Runs of the choice: the file and all quantizers on both kept samples, then one single-sample run per
    candidate (its cost orders the search), then the search on both samples; none fits a budget of 1e-6 dB."""
    from medptq_monai.calibrate import ort_outputs

    counts: list[int] = []
    real = ort_outputs._outputs

    def counted(model, samples):
        counts.append(len(samples))
        return real(model, samples)

    monkeypatch.setattr(ort_outputs, "_outputs", counted)
    model = onnx.load(str(_int8(fp32, "int8_tiny.onnx", ort_output_budget_db=1e-6)))
    summary = json.loads(metadata(model)[SUMMARY_KEY])
    assert summary["candidates"] == 2 and summary["chosen"] == 0 and read_output_quantizers(model) == {}
    assert counts[:4] == [SELECTION_SAMPLES, SELECTION_SAMPLES, 1, 1] and set(counts[4:]) == {SELECTION_SAMPLES}


@pytest.mark.parametrize("budget", [-0.1, float("nan"), float("inf"), "0.3", True])
def test_a_bad_budget_is_refused_before_anything_is_written(fp32: Path, budget) -> None:
    out = fp32.with_name("never.onnx")
    with pytest.raises(CalibrationError, match="ort_output_budget_db must be a number >= 0"):
        quantize_onnx(fp32, out, ct_patches(2, roi=ROI), QuantizeOptions(ort_output_budget_db=budget))
    assert not out.exists()


def test_budget_zero_records_none(fp32: Path) -> None:
    model = onnx.load(str(_int8(fp32, "int8_zero.onnx", ort_output_budget_db=0)))
    assert read_output_quantizers(model) == {}
    assert json.loads(metadata(model)[SUMMARY_KEY])["reason"] == "budget 0"


@pytest.mark.parametrize("value, message", [
    ("{not json", "is not JSON"),
    ("[1, 2]", "must be a JSON object"),
    ('{"t": {"scale": -1}}', "positive finite 'scale'"),
    ('{"t": {"scale": 0.1, "alpha": [1, 2], "shift": [0]}}', "'alpha' \\(positive\\) and 'shift'"),
    ('{"t": {"scale": 0.1, "alpha": "AAA=", "shift": "AAA="}}', "'alpha' \\(positive\\)"),  # float16 zero
    ('{"t": {"scale": 0.1, "alpha": "not base64!", "shift": "AAA="}}', "base64 little-endian float16"),
    ('{"t": {"scale": 0.1, "zero_point": 200}}', "integer 'zero_point' in \\[-128, 127\\]"),
    ('{"t": {"scale": 0.1, "zero_point": 1.5}}', "integer 'zero_point'"),
])
def test_a_malformed_entry_names_the_key(fp32: Path, tmp_path: Path, value: str, message: str) -> None:
    """A hand-edited or corrupt entry: ``read_output_quantizers`` says what is wrong, the engine refuses the file."""
    model = onnx.load(str(_int8(fp32, "int8_bad.onnx", ort_output_budget_db=0)))
    for prop in model.metadata_props:
        if prop.key == KEY:
            prop.value = value
    with pytest.raises(ValueError, match=message):
        read_output_quantizers(model)
    bad = tmp_path / "bad.onnx"
    onnx.save(model, str(bad))
    with pytest.raises(ModelFileError, match=KEY):
        OnnxRuntimeEngine(bad, "int8")
