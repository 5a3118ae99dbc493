"""NNCF as a measured peer: real ``nncf.quantize`` / ``quantize_with_accuracy_control`` on a small real network and
real CT patches, the IR through the OpenVINO engine, and the NNCF row of ``medptq bench``."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import BUNDLE, DATA, ct_patches
from medptq_monai.engines.openvino_engine import OpenVinoEngine
from medptq_monai.errors import CalibrationError, InputImageError, ModelFileError
from medptq_monai.metrics import dice_per_class, mean_dice, sqnr_db

pytest.importorskip("nncf")

from medptq_monai.peers import (  # noqa: E402
    count_int8_ops, nncf_quantize, nncf_quantize_with_accuracy_control, nncf_version, openvino_ir_bytes,
)

ROOT = Path(__file__).resolve().parents[1]
ONE_BIT_DB = 20 * np.log10(2)  # 6.02 dB: one bit of resolution
NNCF_QUICK_SQNR_DB = 18.1  # NNCF's U-Net INT8 in medptq bench --quick (2 calibration patches), measured


@pytest.fixture(scope="module")
def held() -> torch.Tensor:
    """Real CT patches not used for calibration (another seed)."""
    return torch.from_numpy(np.concatenate(ct_patches(4, seed=1)))


@pytest.fixture(scope="module")
def nncf_ir(small_fp32: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """NNCF's INT8 of the small UNet on the same 6 real CT patches as medptq's ``small_int8``."""
    return nncf_quantize(small_fp32, ct_patches(6), tmp_path_factory.mktemp("nncf"))


def test_nncf_ir_runs_in_int8_on_the_openvino_engine(nncf_ir: Path, small_fp32: Path) -> None:
    assert nncf_version() == "3.4.0"
    assert sorted(p.name for p in nncf_ir.parent.iterdir()) == ["model_nncf_int8.bin", "model_nncf_int8.xml"]
    engine = OpenVinoEngine(nncf_ir, "int8")
    fp32 = OpenVinoEngine(small_fp32, "fp32")
    assert engine.spec == fp32.spec  # I/O read from the IR as from the ONNX
    precisions = engine.runtime_precisions()
    conv = {p: n for (layer, p), n in precisions.items() if layer in ("Convolution", "Deconvolution")}
    assert conv and set(conv) <= {"u8", "i8"}, precisions
    # int8 weights: the IR's weights file is about a quarter of the FP32 ONNX (the .xml is the graph's text)
    weights = nncf_ir.with_suffix(".bin").stat().st_size
    assert weights < 0.4 * small_fp32.stat().st_size
    assert openvino_ir_bytes(nncf_ir) == weights + nncf_ir.stat().st_size
    with pytest.raises(InputImageError, match="channel"):
        engine(torch.zeros(1, 2, 32, 32, 32))
    with pytest.raises(InputImageError, match="patches of"):
        engine(torch.zeros(1, 1, 16, 32, 32))


def test_nncf_output_is_as_close_to_fp32_as_medptq_int8(nncf_ir: Path, small_fp32: Path, small_int8: Path,
                                                      held: torch.Tensor) -> None:
    """Both quantized the same network on the same patches: NNCF's SQNR on held-out patches is within one bit
    (6 dB) of medptq's, and far from FP32's own (the IR really is INT8)."""
    reference = OpenVinoEngine(small_fp32, "fp32")(held).numpy()
    ours = sqnr_db(reference, OpenVinoEngine(small_int8, "int8")(held).numpy())
    theirs = sqnr_db(reference, OpenVinoEngine(nncf_ir, "int8")(held).numpy())
    assert theirs > ours - ONE_BIT_DB, (ours, theirs)
    assert theirs < 60.0, theirs  # an unquantized copy would be ~130 dB (float rounding only)


def test_same_seed_same_bytes(nncf_ir: Path, small_fp32: Path, tmp_path: Path) -> None:
    again = nncf_quantize(small_fp32, ct_patches(6), tmp_path)
    for suffix in (".xml", ".bin"):
        assert again.with_suffix(suffix).read_bytes() == nncf_ir.with_suffix(suffix).read_bytes(), suffix
    other = nncf_quantize(small_fp32, ct_patches(6), tmp_path / "sub", subset_size=3, seed=1)
    assert other.with_suffix(".bin").read_bytes() != nncf_ir.with_suffix(".bin").read_bytes()
    assert not [p for p in tmp_path.rglob(".nncf-*")]  # no scratch folder left


def test_bad_inputs_raise_and_write_nothing(small_fp32: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    good = ct_patches(2)
    cases = [
        ([], "no calibration patches"),
        ([np.zeros((1, 2, 32, 32, 32), np.float32)], "shape"),
        ([np.zeros((1, 1, 16, 32, 32), np.float32)], "shape"),
        ([np.zeros((1, 32, 32, 32), np.float32)], r"\[N, C, D, H, W\]"),
        ([good[0].astype(np.int16)], "float numpy array"),
        ([np.full_like(good[0], np.nan)], "NaN"),
    ]
    for patches, match in cases:
        with pytest.raises(CalibrationError, match=match):
            nncf_quantize(small_fp32, patches, out)
    with pytest.raises(CalibrationError, match="subset_size"):
        nncf_quantize(small_fp32, good, out, subset_size=3)
    with pytest.raises(ModelFileError):
        nncf_quantize(tmp_path / "missing.onnx", good, out)
    with pytest.raises(CalibrationError, match="max_dice_drop"):
        nncf_quantize_with_accuracy_control(small_fp32, good, good, 1.5, 3, out)
    with pytest.raises(CalibrationError, match="validation patch 0"):
        nncf_quantize_with_accuracy_control(small_fp32, good, [good[0][:, :, :16]], 0.01, 3, out)
    assert not out.exists()
    with pytest.raises(ModelFileError, match=".bin"):
        OpenVinoEngine(tmp_path / "none.xml", "int8")


def test_missing_nncf_is_a_clear_error(small_fp32: Path) -> None:
    """Without NNCF (import blocked in a fresh interpreter) the quantizer says how to install it and the bench row
    says "not installed"."""
    code = textwrap.dedent(f"""
        import sys
        sys.modules["nncf"] = None
        import numpy as np
        from medptq_monai.benchmark_suite import bench_nncf
        from medptq_monai.errors import EngineUnavailableError
        from medptq_monai.peers import nncf_quantize
        try:
            nncf_quantize({str(small_fp32)!r}, [np.zeros((1, 1, 32, 32, 32), np.float32)], "unused")
        except EngineUnavailableError as err:
            print("ERROR", err)
        print("ROW", bench_nncf(None, None, None, None, None, 3, 1, 1, 2))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ERROR NNCF is not installed: pip install 'medptq-monai[peer]'" in proc.stdout
    assert "ROW {'status': 'not installed'}" in proc.stdout


def test_accuracy_control_meets_the_budget(small_fp32: Path, nncf_ir: Path, held: torch.Tensor,
                                          tmp_path: Path) -> None:
    budget = 0.01
    validation = list(held.numpy()[:, None])
    outcome = nncf_quantize_with_accuracy_control(small_fp32, ct_patches(6), validation, budget, 3, tmp_path)
    assert outcome.ir.is_file() and outcome.seconds > 0
    # recomputed independently through the engine: Dice of the IR's argmax vs the FP32 argmax, pooled
    pred = OpenVinoEngine(outcome.ir, "int8")(held).numpy().argmax(1)
    ref = OpenVinoEngine(small_fp32, "fp32")(held).numpy().argmax(1)
    dice = mean_dice(dice_per_class(pred, ref, 3))
    assert dice == pytest.approx(outcome.dice_vs_fp32, abs=1e-6)
    assert dice >= 1.0 - budget, outcome.nncf_log[-3:]
    assert outcome.weighted_ops == 10 and 0 < outcome.int8_ops <= outcome.weighted_ops
    assert outcome.nncf_quantized_ops is not None and outcome.reverted_ops is not None
    import openvino as ov

    # the plain NNCF run quantizes all 10 convolutions (deconvolutions through a Concat of quantized inputs)
    assert count_int8_ops(ov.Core().read_model(str(nncf_ir))) == (10, 10)
    assert count_int8_ops(ov.Core().read_model(str(outcome.ir))) == (outcome.int8_ops, 10)
    assert json.dumps(outcome.summary())


def test_bench_has_the_nncf_row(tmp_path: Path) -> None:
    """``medptq bench --only unet_int8 --quick True``: NNCF's INT8 of the same FP32 ONNX on the same 2 patches,
    measured beside medptq's (about 45 s on 2 cores)."""
    from medptq_monai.benchmark_suite import nncf_table, run_suite

    report = run_suite(bundles_dir=str(BUNDLE.parent), data_dir=str(DATA), out_dir=str(tmp_path),
                       only="unet_int8", quick=True)
    row = report["rows"][0]
    peer = row["nncf"]
    assert not row["errors"] and peer["status"] == "ok", row["errors"]
    assert report["settings"]["nncf"] == "3.4.0" and peer["calib_patches"] == 2
    assert (tmp_path / "work" / "unet_int8" / "models" / "model_nncf_int8.xml").is_file()
    assert peer["int8_convolutions"] == peer["convolutions"] > 0
    assert 0.8 < peer["ir_bytes"] / row["onnx_int8_bytes"] < 1.25  # both hold int8 weights
    # a real INT8 model, not a broken one (wrong scales give <= 0 dB): within one bit of what NNCF's INT8 measured on
    # this quick run (18.1 dB, twice, Xeon-AMX), and well below OpenVINO FP32 (the bundle's own INT8 keeps 7 layers
    # in float: 41 dB, so it is no longer the reference)
    fp32 = row["sqnr_db_by_engine"]["openvino_fp32"]
    assert NNCF_QUICK_SQNR_DB - ONE_BIT_DB < peer["sqnr_db"] < fp32 - 20.0
    dice = row["dice_vs_fp32"]
    assert 0.5 < dice["openvino_int8"] <= 1.0 and dice["nncf_openvino_int8"] == peer["dice_vs_fp32"] > 0.5
    assert peer["patch_seconds"] > 0
    md = (tmp_path / "benchmark.md").read_text()
    line = next(x for x in md.split("## NNCF side by side")[1].splitlines() if x.startswith("| unet_int8 "))
    assert f"{peer['patch_seconds'] * 1e3:.0f}" in line and f"{peer['sqnr_db']:.1f}" in line
    assert f"{dice['nncf_openvino_int8']:.4f}" in line
    assert json.loads((tmp_path / "benchmark.json").read_text())["rows"][0]["nncf"] == peer
    absent = {**report, "settings": {**report["settings"], "nncf": "not installed"}}
    assert "not installed" in "\n".join(nncf_table(absent))
    assert nncf_table({**report, "settings": {**report["settings"], "nncf": "off"}}) == []


def test_calibrating_at_a_smaller_patch_size_keeps_the_model_shape(small_fp32: Path, held: torch.Tensor,
                                                                   tmp_path: Path) -> None:
    """medptq's ``calibration_roi``: NNCF calibrates the model reshaped to the patches, the IR keeps the ONNX input."""
    small = ct_patches(4, roi=(16, 16, 16))
    with pytest.raises(CalibrationError, match="shape"):
        nncf_quantize(small_fp32, small, tmp_path)
    ir = nncf_quantize(small_fp32, small, tmp_path, calibrate_at_patch_size=True)
    engine = OpenVinoEngine(ir, "int8")
    assert engine.spec == OpenVinoEngine(small_fp32, "fp32").spec
    assert engine(held).shape == (4, 3, 32, 32, 32)


def test_calibration_patches_are_the_ones_quantize_keeps() -> None:
    """``calibration_patches`` draws as ``medptq quantize`` does: the held-back patches (evenly spaced in the seeded
    draw) are left out, the rest keep their order; another seed gives other patches."""
    from medptq_monai.bundle.quantize_bundle import calibration_patches

    data = str(DATA / "images_small")
    every = calibration_patches(BUNDLE, num_patches=6, heldout_patches=0, dataset_dir=data)
    kept = calibration_patches(BUNDLE, num_patches=4, heldout_patches=2, dataset_dir=data)
    assert len(every) == 6 and every[0].shape == (1, 1, 96, 96, 96) and every[0].dtype == np.float32
    assert [k.tobytes() for k in kept] == [every[i].tobytes() for i in (0, 2, 3, 5)]
    other = calibration_patches(BUNDLE, num_patches=6, heldout_patches=0, seed=1, dataset_dir=data)
    assert any(not np.array_equal(a, b) for a, b in zip(every, other))
