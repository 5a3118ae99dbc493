"""The unet_int8 bundle end to end on real CT, through MONAI's own bundle runner."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import onnx
import pytest

from medptq_monai.bundle.runner import run_inference
from medptq_monai.errors import (
    CalibrationError,
    EngineUnavailableError,
    InputImageError,
    ModelFileError,
    UnknownNameError,
)
from medptq_monai.export.onnx_model import io_spec, metadata
from medptq_monai.export.trt_check import check_qdq_for_tensorrt

from conftest import DATA, auto_engine, copy_bundle, int8_run_on_avx2, needs_avx2_simulation, needs_no_tensorrt

SMALL_CT = DATA / "images_small" / "abdomen_ct_small.nii.gz"
INT8 = ("inference.json", "inference_int8.json")  # the bundle's own FP32 config + the INT8 overlay


def _cause(err: BaseException, kind: type) -> BaseException | None:
    while err is not None and not isinstance(err, kind):
        err = err.__cause__ or err.__context__
    return err


def _expect(kind, match, bundle, dataset_dir, out, **overrides):
    with pytest.raises(Exception) as info:
        run_inference(bundle, INT8, dataset_dir=str(dataset_dir), output_dir=str(out), **overrides)
    cause = _cause(info.value, kind)
    assert cause is not None, f"expected {kind.__name__}, got {info.value!r}"
    assert match in str(cause), str(cause)
    assert not out.exists() or not any(out.iterdir()), "a failed case must not leave files"


def _bundle_run(args, cwd, timeout=600):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "monai.bundle", "run", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _regridded_ct(path: Path) -> None:
    """The small CT resampled onto another grid and orientation (LPS-like, anisotropic)."""
    src = nib.load(str(SMALL_CT))
    arr = np.asarray(src.dataobj)[::-1, ::-1][10:110:1, 5:95:1, :]  # flip x/y, crop
    arr = np.repeat(arr, 2, axis=2)[:, :, :50]  # 1.5 mm slices
    affine = np.diag([-3.0, -3.0, 1.5, 1.0])
    affine[:3, 3] = [180.0, 150.0, -40.0]
    nib.save(nib.Nifti1Image(arr.astype(np.int16), affine), str(path))


def test_calibration_writes_compact_trt_ready_int8_model(calibrated_bundle):
    models = calibrated_bundle / "models"
    fp32, int8 = models / "model.onnx", models / "model_int8.onnx"
    ratio = fp32.stat().st_size / int8.stat().st_size
    assert ratio >= 3.5, f"INT8 ONNX only {ratio:.2f}x smaller"  # 3.52x measured with its 7 float layers
    model = onnx.load(str(int8))
    onnx.checker.check_model(model)
    assert check_qdq_for_tensorrt(model) == []
    meta = metadata(model)
    assert meta["medptq.calibrator"] == "mse" and meta["medptq.num_patches"] == "8"
    float_layers = json.loads((calibrated_bundle / "configs" / "metadata.json").read_text())["quantization"][
        "float_layers"]
    assert sorted(meta["medptq.excluded_nodes"].split(",")) == sorted(float_layers)  # the bundle's float_layers
    assert meta["medptq.seed"] == "0" and len(meta["medptq.source_sha256"]) == 64


def test_monai_bundle_run_segments_any_grid_with_input_geometry(calibrated_bundle, tmp_path):
    data = tmp_path / "in"
    data.mkdir()
    shutil.copy(SMALL_CT, data / "small.nii.gz")
    shutil.copy(DATA / "calibration" / "slab_ct_other_patient.nii.gz", data / "slab512.nii.gz")  # 512x512x20, LAS
    _regridded_ct(data / "regrid.nii.gz")
    out = tmp_path / "out"
    # bundle_root "." as in the zoo: run from inside the bundle, no --bundle_root needed
    proc = _bundle_run(["--config_file", json.dumps([f"configs/{c}" for c in INT8]),
                        "--dataset_dir", str(data), "--output_dir", str(out)], cwd=calibrated_bundle)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"'engine': '{auto_engine()}', 'precision': 'int8'" in proc.stdout + proc.stderr
    for name in ("small", "slab512", "regrid"):
        src, seg = nib.load(str(data / f"{name}.nii.gz")), nib.load(str(out / f"{name}_seg.nii.gz"))
        assert seg.shape == src.shape
        assert np.allclose(seg.affine, src.affine)
        labels = np.unique(np.asarray(seg.dataobj))
        assert labels.min() >= 0 and labels.max() <= 13
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "temporary files left behind"


@pytest.fixture(scope="module")
def demo_fp32(tmp_path_factory):
    """The acceptance setting: the shipped demo model calibrated as the demo does (another patient, the
    bundle's calibrator, patch count and float layers), its FP32 segmentation of the whole abdominal CT
    and the reference labels, on the source grid."""
    from medptq_monai.bundle.runner import bundle_parser
    from medptq_monai.bundle.transforms import load_remapped_label

    work = tmp_path_factory.mktemp("demo")
    bundle = copy_bundle(work / "unet_int8")
    _quantize(bundle, DATA / "calibration")
    fp32 = run_inference(bundle, dataset_dir=str(DATA / "images"), output_dir=str(work / "f"))  # inference.json alone
    assert fp32["engine"]["engine"] == "torch-module"
    label_map = bundle_parser(bundle, ["inference.json"]).get_parsed_content("label_map")
    ref = load_remapped_label(DATA / "labels" / "abdomen_ct.nii.gz", label_map)
    return bundle, np.asarray(nib.load(str(work / "f" / "abdomen_ct_seg.nii.gz")).dataobj), ref


def _check_demo_fidelity(fp32_seg, int8_seg, ref) -> None:
    from medptq_monai.metrics import dice_per_class, mean_dice

    agreement = mean_dice(dice_per_class(int8_seg, fp32_seg, 14))
    dice_fp32, dice_int8 = mean_dice(dice_per_class(fp32_seg, ref, 14)), mean_dice(dice_per_class(int8_seg, ref, 14))
    assert dice_fp32 > 0.6, "the demo model should segment the organs"
    assert agreement >= 0.99, f"INT8 vs FP32 Dice {agreement:.4f}"
    assert abs(dice_fp32 - dice_int8) <= 0.005, (dice_fp32, dice_int8)


def test_int8_matches_fp32_on_real_ct(demo_fp32, tmp_path):
    """The acceptance numbers on this host's own INT8 path."""
    bundle, fp32_seg, ref = demo_fp32
    int8 = run_inference(bundle, INT8, dataset_dir=str(DATA / "images"), output_dir=str(tmp_path / "i"),
                         engine="auto", precision="int8", sw_batch_size=3)
    assert int8["engine"]["engine"] == auto_engine()
    _check_demo_fidelity(fp32_seg, np.asarray(nib.load(str(tmp_path / "i" / "abdomen_ct_seg.nii.gz")).dataobj), ref)


@needs_avx2_simulation
def test_int8_matches_fp32_on_the_avx2_path(demo_fp32, tmp_path):
    """The same acceptance numbers on OpenVINO's AVX2 path (16-bit pair sums), through MONAI's CLI."""
    bundle, fp32_seg, ref = demo_fp32
    log = int8_run_on_avx2(bundle, list(INT8), DATA / "images", tmp_path / "i", "--sw_batch_size", "3")
    assert "'isa': 'avx2'" in log and "'int8_model': 'saturation-safe (avx2)" in log, log[-2000:]
    _check_demo_fidelity(fp32_seg, np.asarray(nib.load(str(tmp_path / "i" / "abdomen_ct_seg.nii.gz")).dataobj), ref)


def test_evaluate_config_reports_dice(calibrated_bundle, tmp_path):
    """evaluate.json after the INT8 overlay (INT8 Dice) and after inference.json alone (the FP32 torch Dice)."""
    dice = {}
    for name, configs in (("int8", (*INT8, "evaluate.json")), ("fp32", ("inference.json", "evaluate.json"))):
        result = run_inference(calibrated_bundle, configs, dataset_dir=str(DATA), output_dir=str(tmp_path / name))
        dice[name] = result["metrics"]["val_mean_dice"]
        assert (tmp_path / name / "val_mean_dice_raw.csv").is_file()
    assert 0.5 < dice["fp32"] <= 1.0 and abs(dice["int8"] - dice["fp32"]) <= 0.01, dice


def _nifti(path: Path, arr: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(arr, np.eye(4)), str(path))
    return path


@pytest.mark.parametrize(
    "case, match",
    [
        ("nan", "NaN/Inf"),
        ("two_channels", "expected 1 channel(s), got 2"),
        ("two_d", "rank 4"),
        ("empty_file", "empty (0 bytes)"),
        ("corrupt", "cannot read NIfTI"),
    ],
)
def test_bad_images_fail_clearly_and_write_nothing(calibrated_bundle, tmp_path, case, match):
    data = tmp_path / "in"
    data.mkdir()
    target = data / f"{case}.nii.gz"
    if case == "nan":
        arr = np.asarray(nib.load(str(SMALL_CT)).dataobj, dtype=np.float32)
        arr[50, 50, 10] = np.nan
        _nifti(target, arr)
    elif case == "two_channels":
        _nifti(target, np.zeros((40, 40, 20, 2), np.float32))
    elif case == "two_d":
        _nifti(target, np.zeros((40, 40), np.float32))
    elif case == "empty_file":
        target.write_bytes(b"")
    else:
        target.write_bytes(SMALL_CT.read_bytes()[:2000])
    _expect(InputImageError, match, calibrated_bundle, data, tmp_path / "out")


def test_empty_dataset_folder_is_an_error(calibrated_bundle, tmp_path):
    (tmp_path / "in").mkdir()
    _expect(InputImageError, "no NIfTI files", calibrated_bundle, tmp_path / "in", tmp_path / "out")


def _broken_bundle(calibrated_bundle, tmp_path, edit):
    bundle = copy_bundle(tmp_path / "b")
    for f in ("model.onnx", "model_int8.onnx"):
        shutil.copy(calibrated_bundle / "models" / f, bundle / "models" / f)
    edit(bundle)
    return bundle


def _set_meta(bundle, key, value):
    path = bundle / "configs" / "metadata.json"
    meta = json.loads(path.read_text())
    fmt = meta["network_data_format"]
    {"classes": fmt["outputs"]["pred"], "channels": fmt["inputs"]["image"], "shape": fmt["inputs"]["image"]}[
        key
    ][{"classes": "num_channels", "channels": "num_channels", "shape": "spatial_shape"}[key]] = value
    path.write_text(json.dumps(meta))


@pytest.mark.parametrize(
    "edit, kind, match",
    [
        (lambda b: (b / "models" / "model_int8.onnx").unlink(), ModelFileError, "not found"),
        (lambda b: (b / "models" / "model_int8.onnx").write_bytes(b"\x08\x07garbage" * 100), ModelFileError,
         "corrupt ONNX"),
        (lambda b: _set_meta(b, "classes", 5), ModelFileError, "outputs 14 classes but the bundle metadata says 5"),
        (lambda b: _set_meta(b, "channels", 2), ModelFileError, "takes 1 input channel(s) but the bundle metadata"),
        (lambda b: _set_meta(b, "shape", [64, 64, 64]), ModelFileError, "patches of (96, 96, 96)"),
        (lambda b: shutil.copy(b / "models" / "model.onnx", b / "models" / "model_int8.onnx"), ModelFileError,
         "not an INT8 model"),
    ],
    ids=["missing", "corrupt", "classes", "channels", "shape", "fp32-as-int8"],
)
def test_bad_model_files_fail_clearly(calibrated_bundle, tmp_path, edit, kind, match):
    bundle = _broken_bundle(calibrated_bundle, tmp_path, edit)
    _expect(kind, match, bundle, SMALL_CT.parent, tmp_path / "out")


@pytest.mark.parametrize(
    "overrides, kind, match",
    [
        ({"engine": "tensorflow"}, UnknownNameError, "unknown engine 'tensorflow'"),
        pytest.param({"engine": "tensorrt"}, EngineUnavailableError, "tensorrt", marks=needs_no_tensorrt),
        ({"precision": "int4"}, UnknownNameError, "unknown precision"),
    ],
)
def test_bad_engine_requests_fail_clearly(calibrated_bundle, tmp_path, overrides, kind, match):
    _expect(kind, match, calibrated_bundle, SMALL_CT.parent, tmp_path / "out", **overrides)


def test_cli_exit_code_and_message_on_bad_input(calibrated_bundle, tmp_path):
    data = tmp_path / "in"
    data.mkdir()
    arr = np.asarray(nib.load(str(SMALL_CT)).dataobj, dtype=np.float32)
    arr[0, 0, 0] = np.inf
    _nifti(data / "inf.nii.gz", arr)
    proc = _bundle_run(["--config_file", json.dumps([str(calibrated_bundle / "configs" / c) for c in INT8]),
                        "--bundle_root", str(calibrated_bundle), "--dataset_dir", str(data), "--output_dir",
                        str(tmp_path / "out")], cwd=tmp_path)
    assert proc.returncode != 0
    assert "NaN/Inf" in proc.stderr
    assert not (tmp_path / "out" / "inf_seg.nii.gz").exists()


def test_medptq_quantize_cli_on_our_bundle_and_bad_calibration_inputs(tmp_path):
    """Our bundles are quantized like any bundle: ``medptq quantize``; the options override the metadata's."""
    bundle = copy_bundle(tmp_path / "unet_int8")
    overlay = (bundle / "configs" / "inference_int8.json").read_bytes()
    proc = _medptq(["quantize", str(bundle), "--dataset_dir", str(SMALL_CT.parent), "--num_patches", "2",
                    "--calibrator", "percentile", "--progress", "False"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert metadata(onnx.load(str(bundle / "models" / "model_int8.onnx")))["medptq.calibrator"] == "percentile"
    assert (bundle / "configs" / "inference_int8.json").read_bytes() == overlay, "the template's overlay is rewritten"
    (tmp_path / "empty").mkdir()
    for args, message in ((["--dataset_dir", str(tmp_path / "empty")], "no NIfTI files"),
                          (["--dataset_dir", str(SMALL_CT.parent), "--calibrator", "minmax"],
                           "unknown calibrator 'minmax'")):
        proc = _medptq(["quantize", str(bundle), *args], cwd=tmp_path)
        assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-2000:]


def test_train_config_runs_one_epoch(tmp_path):
    bundle = copy_bundle(tmp_path / "unet_int8")
    (bundle / "models" / "model.pt").unlink()
    configs = json.dumps([str(bundle / "configs" / "inference.json"), str(bundle / "configs" / "train.json")])
    proc = _bundle_run(["--config_file", configs, "--bundle_root", str(bundle), "--dataset_dir", str(DATA),
                        "--max_epochs", "1",
                        "--num_samples", "1"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (bundle / "models" / "model.pt").stat().st_size > 1_000_000



def _quantize(bundle, dataset_dir, **options):
    from medptq_monai.bundle import quantize_bundle

    return quantize_bundle(bundle, progress=False, dataset_dir=str(dataset_dir), **options)


def _medptq(args, cwd, timeout=600):
    return subprocess.run([sys.executable, "-m", "medptq_monai.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def test_failed_calibration_keeps_the_previous_models(calibrated_bundle, tmp_path):
    from medptq_monai.fileio import sha256_file

    bundle = _broken_bundle(calibrated_bundle, tmp_path, lambda b: None)
    before = {f: sha256_file(bundle / "models" / f) for f in ("model.onnx", "model_int8.onnx")}
    data = tmp_path / "nan"
    data.mkdir()
    arr = np.asarray(nib.load(str(SMALL_CT)).dataobj, dtype=np.float32)
    arr[5, 5, 5] = np.nan
    _nifti(data / "nan.nii.gz", arr)
    with pytest.raises(Exception) as info:
        _quantize(bundle, data, num_patches=2)
    assert _cause(info.value, InputImageError) is not None
    assert {f: sha256_file(bundle / "models" / f) for f in before} == before
    assert sorted(p.name for p in (bundle / "models").iterdir()) == ["model.onnx", "model.pt", "model_int8.onnx"]


def test_calibration_roi_smaller_than_the_model_roi(calibrated_bundle, tmp_path):
    bundle = copy_bundle(tmp_path / "unet_int8")
    summary = _quantize(bundle, SMALL_CT.parent, num_patches=2, heldout_patches=1, calibration_roi=[48, 48, 48])
    assert summary["calibration_roi"] == [48, 48, 48]
    int8 = onnx.load(str(bundle / "models" / "model_int8.onnx"))
    assert metadata(int8)["medptq.calibration_roi"] == "48x48x48"
    assert io_spec(int8).input_shape[2:] == (96, 96, 96)
    assert not list((bundle / "models").glob("*calibration*"))
    assert summary["heldout_patches"] == 1 and summary["sqnr_db"] > 15, summary  # held out at the model's roi
    # no held-back patches (as medptq bench calibrates): it failed after calibrating, on a plan of 0 patches
    none_held = _quantize(bundle, SMALL_CT.parent, num_patches=2, heldout_patches=0, calibration_roi=[48, 48, 48])
    assert none_held["heldout_patches"] == 0 and none_held["sqnr_db"] is None, none_held
    before = (bundle / "models" / "model_int8.onnx").read_bytes()
    with pytest.raises(CalibrationError, match="at most the roi"):
        _quantize(bundle, SMALL_CT.parent, num_patches=2, calibration_roi=[128, 96, 96])
    assert (bundle / "models" / "model_int8.onnx").read_bytes() == before
