"""Accuracy-aware PTQ (``--max_dice_drop``): the budget is met on validation patches calibration never saw,
the choice is reproducible, an unreachable budget is reported, and bad requests write nothing."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from medptq_monai.bundle.quantize_bundle import quantize_bundle
from medptq_monai.calibrate.accuracy_control import AccuracyBudgetError, AccuracyControl, ValidationSet
from medptq_monai.calibrate.quantize import QuantizeOptions, quantize_onnx
from medptq_monai.engines import create_engine, first_cpu_engine
from medptq_monai.errors import CalibrationError, UnknownNameError
from medptq_monai.metrics import dice_per_class, mean_dice
from medptq_monai.export.onnx_model import metadata

from conftest import DATA, ct_patches

ZOO = Path(__file__).resolve().parent / "zoo_bundles"
CALIB = [p for p in ct_patches(8)]
VALID = ct_patches(6, seed=11)  # other positions, other seed: never seen by calibration
OPTIONS = QuantizeOptions(calibrator="max")


def _control(budget: float, **kwargs) -> AccuracyControl:
    return AccuracyControl(budget, ValidationSet(VALID), num_classes=3, **kwargs)


def _float_inputs(path: Path, nodes: list[str]) -> bool:
    """Whether every one of ``nodes`` reads no DequantizeLinear output (it really runs in float)."""
    model = onnx.load(str(path))
    dq_outputs = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    by_name = {n.name: n for n in model.graph.node}
    return all(not set(by_name[name].input) & dq_outputs for name in nodes)


def test_budget_is_met_with_layers_back_in_float_and_the_choice_is_reproducible(small_fp32, tmp_path):
    all_int8 = quantize_onnx(small_fp32, tmp_path / "all.onnx", CALIB, OPTIONS, accuracy=_control(0.5))
    assert all_int8.accuracy.float_nodes == [] and all_int8.accuracy.evaluations == 1  # within budget at once
    drop_all = all_int8.accuracy.dice_drop
    budget = drop_all / 2  # so that something must go back to float
    runs = [quantize_onnx(small_fp32, tmp_path / f"r{i}.onnx", CALIB, OPTIONS, accuracy=_control(budget))
            for i in range(2)]
    first = runs[0].accuracy
    assert first.float_nodes and first.dice_drop <= budget < first.dice_drop_all_int8 == pytest.approx(drop_all)
    n = len(all_int8.quantized_nodes)
    assert first.evaluations <= 2 + n + 1 + math.ceil(math.log2(n / 2)), first.history  # see the module docstring
    assert runs[1].accuracy.float_nodes == first.float_nodes  # same seed, same data: same choice
    assert (tmp_path / "r0.onnx").read_bytes() == (tmp_path / "r1.onnx").read_bytes()
    meta = metadata(onnx.load(str(tmp_path / "r0.onnx")))
    assert meta["medptq.accuracy.float_nodes"].split(",") == first.float_nodes
    assert float(meta["medptq.accuracy.dice_drop"]) <= budget and meta["medptq.accuracy.metric"] == "dice_vs_fp32"
    assert set(first.float_nodes) <= set(meta["medptq.excluded_nodes"].split(","))
    assert _float_inputs(tmp_path / "r0.onnx", first.float_nodes)
    assert meta["medptq.accuracy.engine"] == f"{first.engine} ({first.isa})" and first.engine == first_cpu_engine()
    # the drop the file records is the drop of the file written, on the engine that scored it
    ref, out = _argmax(small_fp32, first.engine, "fp32"), _argmax(tmp_path / "r0.onnx", first.engine)
    assert 1 - mean_dice(dice_per_class(out, ref, 3)) == pytest.approx(first.dice_drop, abs=1e-6)


def _argmax(path: Path, engine: str = "onnxruntime", precision: str = "int8") -> np.ndarray:
    run = create_engine(engine, path, precision)
    return np.concatenate([run(torch.from_numpy(p)).numpy() for p in VALID]).argmax(axis=1)


@pytest.mark.parametrize("engine", ["onnxruntime", "openvino"])
def test_each_cpu_engine_can_score_the_candidates(small_fp32, tmp_path, engine):
    result = quantize_onnx(small_fp32, tmp_path / "int8.onnx", CALIB, OPTIONS, accuracy=_control(0.5, engine=engine))
    assert result.accuracy.engine == engine and result.accuracy.isa
    drop = 1 - mean_dice(dice_per_class(_argmax(tmp_path / "int8.onnx", engine),
                                        _argmax(small_fp32, engine, "fp32"), 3))
    assert drop == pytest.approx(result.accuracy.dice_drop, abs=1e-6)


def test_an_engine_that_cannot_score_candidates_is_refused():
    with pytest.raises(UnknownNameError, match="registered engines: auto, torch"):
        _control(0.01, engine="tflite")
    for engine in ("torch", "tensorrt"):
        with pytest.raises(UnknownNameError, match="CPU INT8 engine"):
            _control(0.01, engine=engine)


def test_dice_vs_labels_matches_dice_vs_fp32_when_the_labels_are_the_fp32_segmentation(small_fp32, tmp_path):
    labels = list(_argmax(small_fp32))
    fp32_metric = quantize_onnx(small_fp32, tmp_path / "a.onnx", CALIB, OPTIONS, accuracy=_control(0.5))
    labels_metric = quantize_onnx(small_fp32, tmp_path / "b.onnx", CALIB, OPTIONS, accuracy=AccuracyControl(
        0.5, ValidationSet(VALID, labels), num_classes=3, metric="dice_vs_labels"))
    assert labels_metric.accuracy.dice_drop == pytest.approx(fp32_metric.accuracy.dice_drop, abs=1e-9)


def test_unreachable_budget_is_reported_and_nothing_is_written(small_fp32, tmp_path):
    out = tmp_path / "int8.onnx"
    with pytest.raises(AccuracyBudgetError, match="cannot be met") as info:
        quantize_onnx(small_fp32, out, CALIB, OPTIONS, accuracy=_control(1e-9, max_float_fraction=0.2))
    assert "most harmful" in str(info.value) and "evaluations" in str(info.value)
    with pytest.raises(AccuracyBudgetError, match="allows no layer"):
        quantize_onnx(small_fp32, out, CALIB, OPTIONS, accuracy=_control(1e-9, max_float_fraction=0.0))
    assert not out.exists() and not list(tmp_path.iterdir())


@pytest.mark.parametrize("budget", [0, 1, -0.1, 1.5, True, "0.01"])
def test_budget_outside_zero_one_is_refused(budget):
    with pytest.raises(CalibrationError, match="strictly between 0 and 1"):
        _control(budget)


def test_bad_metric_and_validation_sets_are_refused():
    with pytest.raises(UnknownNameError, match="unknown accuracy metric 'iou'"):
        _control(0.01, metric="iou")
    with pytest.raises(CalibrationError, match="validation set is empty"):
        AccuracyControl(0.01, ValidationSet([]), num_classes=3)
    with pytest.raises(CalibrationError, match="needs a label"):
        _control(0.01, metric="dice_vs_labels")
    with pytest.raises(CalibrationError, match="no foreground"):
        AccuracyControl(0.01, ValidationSet(VALID, [np.zeros(p.shape[2:], np.int64) for p in VALID]), 3,
                        metric="dice_vs_labels")


# ---------------------------------------------------------------- through a zoo-style bundle


@pytest.fixture()
def zoo_bundle(tmp_path) -> Path:
    """The 2-class PReLU CT U-Net bundle (zoo layout) with seeded random weights."""
    from medptq_monai.bundle.bundle_config import read_bundle

    bundle = Path(shutil.copytree(ZOO / "ct_unet_prelu", tmp_path / "ct_unet_prelu"))
    torch.manual_seed(0)
    network = read_bundle(bundle).parsed("network_def", "test")
    (bundle / "models").mkdir(exist_ok=True)
    torch.save(network.state_dict(), bundle / "models" / "model.pt")
    return bundle


def test_bundle_quantize_meets_the_budget_and_records_it(zoo_bundle):
    summary = quantize_bundle(zoo_bundle, num_patches=6, heldout_patches=0, progress=False, max_dice_drop=0.02,
                              validation_patches=4, dataset_dir=str(DATA / "images_small"),
                              val_dataset_dir=str(DATA / "calibration"))
    control = summary["accuracy_control"]
    assert control["dice_drop"] <= 0.02 and control["metric"] == "dice_vs_fp32"
    assert set(control["float_layers"]) <= set(summary["float_layers"])
    meta = json.loads((zoo_bundle / "configs" / "metadata.json").read_text())["quantization"]["accuracy_control"]
    assert meta["float_layers"] == control["float_layers"] and meta["max_dice_drop"] == 0.02
    assert meta["validation"] == {"dataset_dir": str(DATA / "calibration")} and meta["validation_patches"] == 4
    int8 = metadata(onnx.load(str(zoo_bundle / "models" / "model_int8.onnx")))
    assert int8["medptq.accuracy.max_dice_drop"] == "0.02"
    assert meta["engine"] == first_cpu_engine() and int8["medptq.accuracy.engine"].startswith(meta["engine"])


@pytest.mark.parametrize("kwargs, kind, match", [
    ({"max_dice_drop": 0.01, "val_dataset_dir": str(DATA / "images_small")}, CalibrationError, "shares 1 file"),
    ({"max_dice_drop": 0.01}, CalibrationError, "needs a validation set"),
    ({"val_dataset_dir": str(DATA / "calibration")}, CalibrationError, "without --max_dice_drop"),
    ({"max_dice_drop": 0.0, "val_dataset_dir": str(DATA / "calibration")}, CalibrationError, "strictly between"),
    ({"max_dice_drop": 0.01, "metric": "jaccard", "val_dataset_dir": str(DATA / "calibration")}, UnknownNameError,
     "unknown accuracy metric"),
    ({"max_dice_drop": 0.01, "metric": "dice_vs_labels", "val_dataset_dir": str(DATA / "calibration")},
     CalibrationError, "has no 'label'"),
    ({"max_dice_drop": 0.01, "accuracy_engine": "torch", "val_dataset_dir": str(DATA / "calibration")},
     UnknownNameError, "CPU INT8 engine"),
], ids=["overlap", "no-validation", "no-budget", "zero-budget", "metric", "no-labels", "engine"])
def test_bad_accuracy_requests_write_nothing(zoo_bundle, kwargs, kind, match):
    before = sorted(p.relative_to(zoo_bundle) for p in zoo_bundle.rglob("*"))
    meta = (zoo_bundle / "configs" / "metadata.json").read_bytes()
    with pytest.raises(kind, match=match):
        quantize_bundle(zoo_bundle, num_patches=2, heldout_patches=0, progress=False,
                        dataset_dir=str(DATA / "images_small"), **kwargs)
    assert sorted(p.relative_to(zoo_bundle) for p in zoo_bundle.rglob("*")) == before
    assert (zoo_bundle / "configs" / "metadata.json").read_bytes() == meta


def test_validation_set_is_the_one_quantize_scores_on_and_refuses_bad_requests() -> None:
    """``quantize_bundle.validation_set`` (for scoring another quantizer alike): the seeded validation patches at
    the bundle's roi and its whole volumes; no validation set, an unknown metric or shared files are refused."""
    from medptq_monai.bundle.quantize_bundle import validation_set

    bundle = Path(__file__).resolve().parents[1] / "bundles" / "unet_int8"
    calibration, images = str(DATA / "calibration"), str(DATA / "images")
    first, classes = validation_set(bundle, dataset_dir=calibration, val_dataset_dir=images, validation_patches=3)
    again, _ = validation_set(bundle, dataset_dir=calibration, val_dataset_dir=images, validation_patches=3)
    assert len(first.images) == 3 and first.images[0].shape == (1, 1, 96, 96, 96) and len(first.volumes) == 1
    assert classes >= 2 and first.labels is None
    assert all(np.array_equal(a, b) for a, b in zip(first.images, again.images, strict=True))
    with pytest.raises(CalibrationError, match="validation set is needed"):
        validation_set(bundle, dataset_dir=calibration)
    with pytest.raises(UnknownNameError, match="unknown accuracy metric"):
        validation_set(bundle, metric="dice", dataset_dir=calibration, val_dataset_dir=images)
    with pytest.raises(CalibrationError, match="shares 1 file"):
        validation_set(bundle, dataset_dir=calibration, val_dataset_dir=calibration)
