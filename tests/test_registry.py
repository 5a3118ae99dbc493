"""Engines and calibrators are registries: one registration makes a name usable everywhere, and an
unknown name is an error that lists the registered ones."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medptq_monai.benchmark import parse_engines, registry_rows
from medptq_monai.calibrate import calibrators
from medptq_monai.calibrate.calibrators import CALIBRATORS, DEFAULT_CALIBRATOR, CalibratorSpec, register_calibrator
from medptq_monai.calibrate.quantize import QuantizeOptions, quantize_onnx
from medptq_monai.engines import create_engine, engine_names, registry
from medptq_monai.engines.registry import EngineSpec, register_engine
from medptq_monai.errors import UnknownNameError

from conftest import ct_patches


def test_unknown_engine_lists_the_registered_ones(small_int8):
    with pytest.raises(UnknownNameError) as err:
        create_engine("tensorflow", small_int8)
    for name in ("auto", "onnxruntime", "openvino", "tensorrt", "torch"):
        assert name in str(err.value)
    with pytest.raises(UnknownNameError, match="registered engines"):
        parse_engines("openvino,tflite")


def test_unknown_calibrator_lists_the_registered_ones():
    with pytest.raises(UnknownNameError) as err:
        QuantizeOptions(calibrator="kl")
    assert all(name in str(err.value) for name in ("max", "entropy", "percentile", "mse"))


def test_one_default_calibrator_everywhere():
    from medptq_monai.bundle.bundle_config import read_bundle
    from medptq_monai.bundle.quantize_bundle import bundle_quantization

    from conftest import ROOT

    assert QuantizeOptions().calibrator == DEFAULT_CALIBRATOR in CALIBRATORS
    # a bundle whose metadata names no calibrator gets the default, as QuantizeOptions does
    bundle = read_bundle(ROOT / "tests" / "zoo_bundles" / "ct_unet_prelu")
    assert "quantization" not in bundle.parser.get("_meta_")
    assert bundle_quantization(bundle).options.calibrator == DEFAULT_CALIBRATOR


def test_names_are_registered_once():
    with pytest.raises(ValueError, match="taken"):
        register_engine(registry.engine_spec("openvino"))
    with pytest.raises(ValueError, match="taken"):
        register_engine(EngineSpec("auto", "x", ".x:X", "x", ("cpu",), ("fp32",)))
    with pytest.raises(ValueError, match="taken"):
        register_calibrator(CALIBRATORS["max"])


def test_a_registered_engine_is_usable_everywhere(monkeypatch, small_int8):
    """One registration: create_engine, check_engine_name, the benchmark's rows and auto's CPU order see it."""
    spec = EngineSpec("ort_sequential", "ONNX Runtime (sequential)", ".onnxruntime_engine:OnnxRuntimeEngine",
                      "onnxruntime", ("cpu",), ("fp32", "int8"), cpu_rank=2)
    monkeypatch.setitem(registry._REGISTRY, spec.name, spec)
    assert spec.name in engine_names()
    engine = create_engine(spec.name, small_int8, "int8", threads=1)
    assert engine(torch.from_numpy(np.concatenate(ct_patches(1)))).shape[1] == 3
    monkeypatch.setattr("medptq_monai.benchmark.BENCH_ENGINES", engine_names(include_auto=False))
    labels = {r.label for r in registry_rows("cpu")}
    assert {"ONNX Runtime (sequential) FP32", "ONNX Runtime (sequential) INT8"} <= labels
    assert [s.name for s in registry.cpu_engines()] == ["openvino", "onnxruntime", "ort_sequential"]


def test_a_registered_calibrator_is_usable(monkeypatch, small_fp32, tmp_path):
    spec = CalibratorSpec("max_again", calibrators.MinMaxCalibrater, histogram=False)
    monkeypatch.setitem(CALIBRATORS, spec.name, spec)
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    quantize_onnx(small_fp32, a, ct_patches(2), QuantizeOptions(calibrator="max_again"))
    quantize_onnx(small_fp32, b, ct_patches(2), QuantizeOptions(calibrator="max"))
    import onnx

    inits = [{i.name: i.raw_data for i in onnx.load(str(p)).graph.initializer} for p in (a, b)]
    assert inits[0] == inits[1]  # same statistics, same file contents
