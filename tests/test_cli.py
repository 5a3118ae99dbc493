"""The ``medptq`` command line: results on good input, one clear line and exit 2 on bad input."""

import subprocess
import sys

import numpy as np
import onnx
from onnx import numpy_helper

from conftest import DATA


def _medptq(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "medptq_monai.cli", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=600)


def test_check_passes_a_real_int8_model_and_fails_a_broken_one(small_int8, tmp_path):
    ok = _medptq("check", str(small_int8))
    assert ok.returncode == 0, ok.stderr
    assert "quantize_linear" in ok.stdout
    model = onnx.load(str(small_int8))
    index, zp = next((i, t) for i, t in enumerate(model.graph.initializer)
                     if t.name.endswith("_zero_point") and not t.dims)
    model.graph.initializer[index].CopyFrom(numpy_helper.from_array(np.array(3, np.int8), zp.name))
    bad = tmp_path / "bad.onnx"
    onnx.save(model, str(bad))
    fail = _medptq("check", str(bad))
    assert fail.returncode == 2
    assert "medptq: error:" in fail.stderr and "zero point" in fail.stderr


def test_missing_model_file_is_one_clear_line(tmp_path):
    proc = _medptq("check", str(tmp_path / "none.onnx"))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("medptq: error: ONNX model not found")


def test_quantize_rejects_unknown_calibrator_and_empty_data(calibrated_bundle, tmp_path):
    before = {p.name: p.read_bytes() for p in (calibrated_bundle / "models").iterdir()}
    proc = _medptq("quantize", str(calibrated_bundle), "--dataset_dir", str(DATA / "images_small"), "--calibrator", "kl")
    assert proc.returncode == 2 and "unknown calibrator 'kl'" in proc.stderr
    (tmp_path / "empty").mkdir()
    proc = _medptq("quantize", str(calibrated_bundle), "--dataset_dir", str(tmp_path / "empty"))
    assert proc.returncode == 2 and "no NIfTI files" in proc.stderr
    assert {p.name: p.read_bytes() for p in (calibrated_bundle / "models").iterdir()} == before


def test_bench_rejects_unknown_engine_and_bundle():
    proc = _medptq("bench_volume", "--engines", "tflite")
    assert proc.returncode == 2 and "tflite" in proc.stderr
    proc = _medptq("bench", "--only", "nosuch_int8")
    assert proc.returncode == 2 and "unknown bundle(s) ['nosuch_int8']" in proc.stderr


def test_info_reports_engines_isa_and_calibrators():
    import json
    import os

    from medptq_monai.engines.cpu_isa import host_isa

    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"}
    proc = subprocess.run([sys.executable, "-m", "medptq_monai.cli", "info"], capture_output=True, text=True,
                          timeout=600, env=env)
    assert proc.returncode == 0 and "int8_isa:" in proc.stdout and "engines:" in proc.stdout, proc.stderr
    code = "import json; from medptq_monai.cli import Commands; print(json.dumps(Commands().info()))"
    info = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                                     env=env, check=True).stdout)
    assert info["int8_isa"]["host"] == host_isa() and info["int8_isa"]["onednn_max_cpu_isa"] == "AVX2"
    assert info["int8_isa"]["engines"]["openvino"] == {"isa": "avx2", "label": "AVX2 without VNNI (16-bit pair sums, "
                                                       "saturating)", "int8_model": "saturation-safe copy"}
    assert set(info["engines"]) == {"torch", "onnxruntime", "openvino", "tensorrt"}
    assert info["engines"]["openvino"]["installed"] and info["auto_cpu_engine"] == "openvino"
    assert info["default_calibrator"] == "mse" and set(info["calibrators"]) == {"max", "entropy", "percentile", "mse"}
    assert "tensorrt_usable" in info and f"INT8 ISA {host_isa()}" in info["summary"]
