"""Benchmark: a real quick run (torch, ONNX Runtime, OpenVINO; TensorRT skipped without a GPU) on the
small real CT with a shrunken copy of the bundle, plus the Dice helpers and input errors."""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from medptq_monai.benchmark import parse_engines, run_benchmark, time_calls, time_interleaved
from medptq_monai.benchmark_suite import find_bundles, run_suite
from medptq_monai.metrics import dice_per_class, mean_dice, sqnr_db, sqnr_db_from_sums, sum_of_squares
from medptq_monai.bundle.runner import bundle_parser
from medptq_monai.calibrate.ort_outputs import DEFAULT_BUDGET_DB
from medptq_monai.engines.tensorrt_engine import tensorrt_available
from medptq_monai.errors import InputImageError, MedPTQError, ModelFileError, UnknownNameError

from conftest import BUNDLE, DATA, copy_bundle

ROI = [48, 48, 48]
ROW_KEYS = {
    "label", "engine", "precision", "device", "status", "reason", "patch_median_s", "patch_p95_s", "patch_times_s",
    "volume_s", "volume_times_s", "speedup_vs_torch_volume", "speedup_vs_torch_patch", "dice_vs_labels",
    "dice_per_class_vs_labels", "dice_vs_torch_fp32", "sqnr_db", "peak_rss_bytes",
}


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data, indent=2))


def _shrink(meta: dict) -> None:
    for io in ("inputs", "outputs"):
        for spec in meta["network_data_format"][io].values():
            spec["spatial_shape"] = ROI
    meta["quantization"]["float_layers"] = []  # chosen for the shipped network, not this smaller one


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundle's configs with a smaller UNet (same block types), a 48³ roi and a seeded random checkpoint."""
    bundle = copy_bundle(tmp_path_factory.mktemp("bench") / "unet_int8")
    _edit_json(bundle / "configs" / "inference.json", lambda c: (
        c["network_def"].update(channels=[8, 16, 32, 128], strides=[2, 2, 2], num_res_units=1),
        c.update(overlap=0.25),
    ))
    _edit_json(bundle / "configs" / "metadata.json", _shrink)
    torch.manual_seed(0)
    net = bundle_parser(bundle, ["inference.json"]).get_parsed_content("network_def")
    (bundle / "models").mkdir(exist_ok=True)
    torch.save(net.state_dict(), bundle / "models" / "model.pt")
    return bundle


@pytest.fixture(scope="module")
def report(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One quick benchmark; the ONNX models come from the calibration subprocess (2 patches)."""
    out = tmp_path_factory.mktemp("reports")
    return run_benchmark(bundle=str(tiny_bundle), data_dir=str(DATA), out_dir=str(out), quick=True,
                         engines="torch,onnxruntime,openvino,tensorrt", calibrate=True, calib_patches=2)


def test_reports_written(report: dict) -> None:
    files = {k: Path(v) for k, v in report["files"].items()}
    assert all(p.is_file() and p.stat().st_size > 0 for p in files.values())
    assert files["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    on_disk = json.loads(files["json"].read_text())
    assert on_disk["rows"] == report["rows"] and on_disk["schema"] == "medptq-benchmark-v1"
    assert not list(files["json"].parent.glob(".*tmp*"))  # atomic writes left no temporaries
    s = on_disk["settings"]
    assert s["quick"] and (s["repeats"], s["warmup"], s["volume_repeats"]) == (3, 1, 1)
    assert s["roi_size"] == ROI and s["patch_shape"] == [1, 1, *ROI]
    assert Path(s["volume_image"]).parent.name == "images_small"
    machine = on_disk["machine"]
    assert machine["cpu_count"] >= 1 and machine["torch_threads"] >= 1 and machine["cpu_model"]
    assert {"torch", "monai", "onnxruntime", "openvino", "tensorrt"} <= set(machine["versions"])
    assert machine["date"] and isinstance(machine["command"], list)


def test_rows_measured(report: dict) -> None:
    rows = {(r["engine"], r["precision"]): r for r in report["rows"] if r["device"] == "cpu"}
    assert set(rows) == {("torch", "fp32"), ("onnxruntime", "fp32"), ("onnxruntime", "int8"),
                         ("openvino", "fp32"), ("openvino", "int8")}
    for row in report["rows"]:
        assert ROW_KEYS <= set(row)
    for row in rows.values():
        assert row["status"] == "ok", row["reason"]
        assert len(row["patch_times_s"]) == 3 and 0 < row["patch_median_s"] <= row["patch_p95_s"]
        assert row["volume_s"] > 0 and row["peak_rss_bytes"] > 0
        assert row["speedup_vs_torch_volume"] > 0 and row["speedup_vs_torch_patch"] > 0
        for key in ("dice_vs_labels", "dice_vs_torch_fp32"):
            assert row[key] is None or 0.0 <= row[key] <= 1.0
        assert all(0.0 <= v <= 1.0 for v in row["dice_per_class_vs_labels"].values())
    torch_row = rows[("torch", "fp32")]
    assert torch_row["speedup_vs_torch_volume"] == 1.0 and torch_row["dice_vs_torch_fp32"] in (1.0, None)
    # FP32 ONNX reproduces the torch argmax almost exactly
    assert rows[("onnxruntime", "fp32")]["dice_vs_torch_fp32"] > 0.95
    assert rows[("onnxruntime", "fp32")]["sqnr_db"] > 60.0 and rows[("openvino", "fp32")]["sqnr_db"] > 60.0
    # INT8: OpenVINO and ONNX Runtime run the same QDQ file on the same patch, so their SQNR vs torch FP32 is the
    # file's own (reference: the other runtime), within 1 dB; an engine that mis-executes the QDQ arithmetic
    # (OpenVINO 2026.4's Concat-fed convolutions) or a row fed another model fails here
    ov_db, ort_db = rows[("openvino", "int8")]["sqnr_db"], rows[("onnxruntime", "int8")]["sqnr_db"]
    assert abs(ov_db - ort_db) <= 1.0, (ov_db, ort_db)
    assert ov_db < rows[("openvino", "fp32")]["sqnr_db"] - 20.0  # and it is the INT8 file (20 dB noisier)


def test_sizes_and_calibration(report: dict) -> None:
    sizes, cal = report["sizes"], report["calibration"]
    assert sizes["onnx_fp32_bytes"] > sizes["onnx_int8_bytes"] > 0
    assert sizes["size_ratio"] > 3.5
    assert cal["ran"] and cal["calib_peak_bytes"] > 50 * 2**20 and cal["seconds"] > 0


def test_markdown_has_a_row_per_engine(report: dict) -> None:
    md = Path(report["files"]["md"]).read_text()
    table = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| engine")]
    assert len(table) == len(report["rows"])
    for row in report["rows"]:
        assert any(line.startswith(f"| {row['label']}") for line in table)
    assert "ONNX size" in md and "Machine:" in md


@pytest.mark.skipif(tensorrt_available()[0], reason="TensorRT is usable here")
def test_tensorrt_reported_as_skipped(report: dict) -> None:
    trt = [r for r in report["rows"] if r["engine"] == "tensorrt"]
    assert [r["precision"] for r in trt] == ["fp32", "fp16", "int8"]
    assert all(r["status"] == "skipped" and r["reason"] for r in trt)
    assert all(r["patch_median_s"] is None and r["dice_vs_labels"] is None for r in trt)


def test_existing_models_are_reused(tiny_bundle: Path, report: dict, tmp_path: Path) -> None:
    """No calibration without asking when the INT8 model exists; the engine filter limits rows."""
    int8 = tiny_bundle / "models" / "model_int8.onnx"
    mtime = int8.stat().st_mtime_ns
    again = run_benchmark(bundle=str(tiny_bundle), data_dir=str(DATA), out_dir=str(tmp_path), quick=True,
                          engines="openvino", threads=1)
    assert int8.stat().st_mtime_ns == mtime
    assert not again["calibration"]["ran"] and again["calibration"]["calib_peak_bytes"] is None
    assert again["calibration"]["note"]
    assert [(r["engine"], r["precision"], r["status"]) for r in again["rows"]] == [
        ("openvino", "fp32", "ok"), ("openvino", "int8", "ok")]
    assert again["rows"][0]["speedup_vs_torch_volume"] is None  # no torch row asked for
    assert again["settings"]["threads"] == 1


def test_bad_inputs(tmp_path: Path) -> None:
    with pytest.raises(UnknownNameError):
        run_benchmark(engines="torch,tensorflow", out_dir=str(tmp_path))
    with pytest.raises(UnknownNameError):
        parse_engines("auto")
    assert parse_engines(("openvino", "torch")) == ("openvino", "torch")  # what fire passes for "openvino,torch"
    with pytest.raises(ModelFileError):
        run_benchmark(bundle=str(tmp_path / "nope"), data_dir=str(DATA), out_dir=str(tmp_path))
    with pytest.raises(InputImageError):
        run_benchmark(bundle=str(BUNDLE), data_dir=str(tmp_path / "nope"), out_dir=str(tmp_path))
    assert not list(tmp_path.iterdir())


def test_time_calls_adds_calls_up_to_min_seconds() -> None:
    calls = []

    def fn() -> int:
        calls.append(1)
        time.sleep(0.01)
        return len(calls)

    times, last = time_calls(fn, warmup=2, repeats=1, min_seconds=0.045)
    assert 5 <= len(times) <= 9 and sum(times) >= 0.045 and last == len(calls) == len(times) + 2
    times, _ = time_calls(fn, warmup=0, repeats=1, min_seconds=60.0, max_repeats=3)
    assert len(times) == 3  # capped
    times, _ = time_calls(fn, warmup=0, repeats=4)
    assert len(times) == 4  # no minimum: exactly the repeats


def test_time_interleaved_alternates_and_each_gets_its_calls() -> None:
    """Calls alternate a, b then b, a (neither always first); the fast one keeps the rounds going until its own
    calls total min_seconds, so both get the same number of calls, capped."""
    order: list[str] = []

    def fn(name: str, seconds: float):
        def call() -> str:
            order.append(name)
            time.sleep(seconds)
            return name
        return call

    (slow, last_slow), (fast, last_fast) = time_interleaved([fn("a", 0.02), fn("b", 0.002)], warmup=1, repeats=2,
                                                            min_seconds=0.01, max_repeats=8)
    assert order[:2] == ["a", "b"] and order[2:6] == ["a", "b", "b", "a"]
    assert len(slow) == len(fast) >= 2 and (last_slow, last_fast) == ("a", "b")
    assert sum(fast) >= 0.01 and (len(fast) == 2 or sum(fast[:-1]) < 0.01)  # the round that reached it was the last
    assert min(slow) > max(fast)
    order.clear()
    timed = time_interleaved([fn("a", 0.0), fn("b", 0.0)], warmup=0, repeats=1, min_seconds=10.0, max_repeats=3)
    assert [len(t) for t, _ in timed] == [3, 3] and order == ["a", "b", "b", "a", "a", "b"]


def test_sqnr_db_pooled_from_sums_equals_sqnr_db_of_the_arrays_joined() -> None:
    rng = np.random.default_rng(0)
    refs = [rng.standard_normal((2, 3, 8, 8, 8)).astype(np.float32) for _ in range(2)]
    tests = [r + 0.01 * rng.standard_normal(r.shape).astype(np.float32) for r in refs]
    assert sum_of_squares(refs[0]) == pytest.approx(float(np.sum(refs[0].astype(np.float64) ** 2)), rel=1e-12)
    pooled = sqnr_db_from_sums(sum(map(sum_of_squares, refs)), sum(sum_of_squares(r - t) for r, t in zip(refs, tests)))
    joined = sqnr_db(np.concatenate([r.ravel() for r in refs]), np.concatenate([t.ravel() for t in tests]))
    assert pooled == pytest.approx(joined, abs=1e-6) and 35 < pooled < 45
    assert sqnr_db(refs[0], refs[0]) == math.inf and sqnr_db_from_sums(0.0, 1.0) == -math.inf


def test_dice_per_class() -> None:
    ref = np.array([[0, 1, 1], [2, 2, 0]])
    assert dice_per_class(ref, ref, 4) == {1: 1.0, 2: 1.0}  # class 3 absent from ref: not scored
    pred = np.array([[0, 1, 0], [2, 3, 3]])
    d = dice_per_class(pred, ref, 4)
    assert d == pytest.approx({1: 2 * 1 / (2 + 1), 2: 2 * 1 / (2 + 1)})
    assert mean_dice(d) == pytest.approx(2 / 3)
    assert dice_per_class(np.zeros((2, 2), int), ref[:, :2], 3) == {1: 0.0, 2: 0.0}  # missed organs score 0
    assert dice_per_class(pred, np.zeros_like(pred), 4) == {} and mean_dice({}) is None
    with pytest.raises(ValueError):
        dice_per_class(pred, ref[:, :2], 4)


# ---- the all-bundles suite (medptq bench) -------------------------------------------------------------


@pytest.fixture(scope="module")
def suite(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The suite over two bundles: the tiny U-Net without shipped weights (random weights are made) and a
    broken copy (its network cannot be built), quick mode."""
    bundles = tmp_path_factory.mktemp("bundles")
    shutil.copytree(tiny_bundle, bundles / "a_unet", ignore=shutil.ignore_patterns("*.onnx", "*.pt"))
    broken = shutil.copytree(tiny_bundle, bundles / "b_broken", ignore=shutil.ignore_patterns("*.onnx", "*.pt"))
    _edit_json(broken / "configs" / "inference.json", lambda c: c["network_def"].update(_target_="NoSuchNet"))
    (bundles / "not_a_bundle").mkdir()
    return run_suite(bundles_dir=str(bundles), data_dir=str(DATA), out_dir=str(tmp_path_factory.mktemp("out")),
                     quick=True)


def test_suite_rows(suite: dict) -> None:
    assert [r["bundle"] for r in suite["rows"]] == ["a_unet", "b_broken"]
    row, broken = suite["rows"]
    assert "NoSuchNet" in broken["error"]
    assert {"model", "params", "onnx_fp32_bytes", "onnx_int8_bytes", "patch_seconds", "calib_peak_bytes",
            "sqnr_db"} <= set(row)
    assert row["weights"].startswith("random") and row["params"] > 100_000 and not row["errors"]
    assert row["onnx_checker"] == "ok" and row["tensorrt_check_issues"] == [] and row["float_weight_qdq"] == 0
    assert set(row["patch_seconds"]) == {"torch_fp32", "onnxruntime_fp32", "onnxruntime_int8", "openvino_fp32",
                                         "openvino_int8"}
    assert all(v > 0 for v in row["patch_seconds"].values())
    # quick: more timed calls while an engine's total is under QUICK["min_seconds"], at most 9
    assert all(1 <= len(t) <= 9 and (len(t) == 9 or sum(t) >= 3.0) for t in row["patch_times_s"].values())
    assert suite["settings"]["min_seconds"] == 3.0 and suite["settings"]["timing"] == "interleaved"
    for engine in ("onnxruntime", "openvino"):  # one runtime's precisions alternate: one call each per round
        assert len(row["patch_times_s"][f"{engine}_fp32"]) == len(row["patch_times_s"][f"{engine}_int8"])
    assert row["ort_output_quantizers"]["budget_db"] == DEFAULT_BUDGET_DB  # the INT8 file's choice, in the row
    assert row["onnx_fp32_bytes"] / row["onnx_int8_bytes"] > 3.5
    assert row["calib_peak_bytes"] > 50 * 2**20
    by_engine = row["sqnr_db_by_engine"]
    assert by_engine["openvino_fp32"] > 60.0 and row["sqnr_db"] == by_engine["openvino_int8"]
    # the same INT8 file on the other runtime is the reference (see test_rows_measured)
    assert abs(by_engine["openvino_int8"] - by_engine["onnxruntime_int8"]) <= 1.0, by_engine
    assert by_engine["openvino_int8"] < by_engine["openvino_fp32"] - 20.0
    assert suite["settings"]["quick"] and suite["settings"]["calib_patches"] == 2


def test_suite_reports_match(suite: dict) -> None:
    files = {k: Path(v) for k, v in suite["files"].items()}
    assert json.loads(files["json"].read_text())["rows"] == suite["rows"]
    assert files["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = files["md"].read_text()
    row = suite["rows"][0]
    line = next(x for x in md.splitlines() if x.startswith("| a_unet "))
    assert f"{row['patch_seconds']['openvino_int8'] * 1e3:.0f}" in line and f"{row['sqnr_db']:.1f}" in line
    assert "| b_broken (failed)" in md and "TensorRT" in md
    assert "ONNX Runtime output quantizers recorded in each INT8 file" in md and "a_unet " in md


def test_suite_bad_inputs(tmp_path: Path) -> None:
    with pytest.raises(MedPTQError, match="no bundles"):
        run_suite(bundles_dir=str(tmp_path), out_dir=str(tmp_path))
    with pytest.raises(UnknownNameError, match="nope"):
        run_suite(bundles_dir=str(BUNDLE.parent), only="unet_int8,nope", out_dir=str(tmp_path))
    with pytest.raises(InputImageError):
        run_suite(bundles_dir=str(BUNDLE.parent), data_dir=str(tmp_path / "x"), out_dir=str(tmp_path))
    assert find_bundles(BUNDLE.parent, "unet_int8") == [BUNDLE]
    assert not list(tmp_path.iterdir())
