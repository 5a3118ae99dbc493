"""TensorRT engine: availability, error paths and plan-cache keys everywhere; real build/run on a GPU only."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from medptq_monai.engines.tensorrt_engine import (
    TensorRTEngine,
    convert_to_fp16_onnx,
    plan_cache_key,
    tensorrt_available,
)
from medptq_monai.errors import EngineUnavailableError, ModelFileError, UnknownNameError

TRT_OK, TRT_REASON = tensorrt_available()
needs_trt = pytest.mark.skipif(not TRT_OK, reason=f"TensorRT engine unavailable: {TRT_REASON}")


class TinySeg(torch.nn.Module):
    """1 channel in, 3 classes out, [N, 1, 8, 8, 8]: strided Conv down, ConvTranspose up (the U-Net decoder
    layer whose INT8 weights TensorRT reads its own way; Cin 4 != Cout 6), 1x1 Conv head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv3d(1, 4, 3, stride=2, padding=1)
        self.up = torch.nn.ConvTranspose3d(4, 6, 2, stride=2)
        self.conv2 = torch.nn.Conv3d(6, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(torch.relu(self.up(torch.relu(self.conv1(x)))))


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(0)
    model = TinySeg().eval()
    path = tmp_path_factory.mktemp("trt") / "tiny.onnx"
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (torch.zeros(1, 1, 8, 8, 8),),
            str(path),
            input_names=["input"],
            output_names=["output"],
            dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )
    return path, model


@pytest.fixture(scope="module")
def tiny_qdq_onnx(tiny_onnx: tuple[Path, torch.nn.Module]) -> Path:
    """QDQ INT8 copy of the tiny model as this package writes it (calibrate.quantize.quantize_onnx)."""
    from medptq_monai.calibrate.quantize import QuantizeOptions, quantize_onnx

    gen = torch.Generator().manual_seed(1)
    patches = [torch.randn(1, 1, 8, 8, 8, generator=gen).numpy() for _ in range(4)]
    src = tiny_onnx[0]
    dst = src.with_name("tiny.int8.onnx")
    quantize_onnx(src, dst, patches, QuantizeOptions(calibrator="max"))
    return dst


def test_tiny_int8_model_quantizes_the_convtranspose(tiny_qdq_onnx: Path) -> None:
    """The GPU INT8 test below covers an INT8 ConvTranspose, with the weight layout the check accepts."""
    from medptq_monai.export.trt_check import check_qdq_for_tensorrt, qdq_summary

    assert qdq_summary(tiny_qdq_onnx)["quantized_ops"] == {"Conv": 2, "ConvTranspose": 1}
    assert check_qdq_for_tensorrt(tiny_qdq_onnx) == []


def test_availability_reports_a_reason() -> None:
    ok, reason = tensorrt_available()
    assert isinstance(ok, bool)
    if ok:
        assert reason == ""
    else:
        assert reason.strip()


@pytest.mark.skipif(TRT_OK, reason="TensorRT is usable here; the unavailable path cannot be exercised")
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_unavailable_raises_with_reason(
    tiny_onnx: tuple[Path, torch.nn.Module], tiny_qdq_onnx: Path, tmp_path: Path, precision: str
) -> None:
    path = tiny_qdq_onnx if precision == "int8" else tiny_onnx[0]
    with pytest.raises(EngineUnavailableError) as info:
        TensorRTEngine(path, precision=precision, cache_dir=tmp_path / "cache")
    assert TRT_REASON in str(info.value)
    assert not (tmp_path / "cache").exists()


def test_missing_onnx_is_model_file_error(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match="not found"):
        TensorRTEngine(tmp_path / "absent.onnx")


def test_bad_arguments(tiny_onnx: tuple[Path, torch.nn.Module]) -> None:
    path, _ = tiny_onnx
    with pytest.raises(UnknownNameError, match="int4"):
        TensorRTEngine(path, precision="int4")
    with pytest.raises(ValueError, match="CUDA"):
        TensorRTEngine(path, device="cpu")
    with pytest.raises(ValueError, match="opt_batch"):
        TensorRTEngine(path, opt_batch=9, max_batch=8)


def test_plan_cache_key_is_deterministic_and_sensitive() -> None:
    base = dict(
        onnx_sha256="ab" * 32, trt_version="10.13.0", gpu="NVIDIA H100 sm_90", precision="int8", profile=(1, 4, 8)
    )
    key = plan_cache_key(**base)
    assert key == plan_cache_key(**base)
    assert len(key) == 64 and int(key, 16) >= 0
    changes = {
        "onnx_sha256": "cd" * 32,
        "trt_version": "11.4.0",
        "gpu": "NVIDIA H200 sm_90",
        "precision": "fp16",
        "profile": (1, 4, 16),
    }
    keys = {key}
    for field, value in changes.items():
        keys.add(plan_cache_key(**{**base, field: value}))
    assert len(keys) == 1 + len(changes)
    assert plan_cache_key(**{**base, "profile": (1, 2, 8)}) != key
    assert plan_cache_key(**{**base, "profile": (2, 4, 8)}) != key


def test_fp16_conversion_keeps_fp32_io(tiny_onnx: tuple[Path, torch.nn.Module], tmp_path: Path) -> None:
    path = tiny_onnx[0]
    out = convert_to_fp16_onnx(path, tmp_path / "tiny.fp16.onnx")
    model = onnx.load(str(out))
    onnx.checker.check_model(model)
    f32, f16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    assert model.graph.input[0].type.tensor_type.elem_type == f32
    assert model.graph.output[0].type.tensor_type.elem_type == f32
    assert {init.data_type for init in model.graph.initializer} == {f16}
    # the FP16 graph still computes the same function (ONNX Runtime CPU runs it)
    import onnxruntime as ort

    x = torch.randn(2, 1, 8, 8, 8)
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        want = tiny_onnx[1](x).numpy()
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=1e-2, rtol=1e-2)


@needs_trt
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_build_run_and_cache_reuse(
    tiny_onnx: tuple[Path, torch.nn.Module], tmp_path: Path, precision: str
) -> None:
    path, model = tiny_onnx
    cache = tmp_path / "cache"
    engine = TensorRTEngine(path, precision=precision, cache_dir=cache, max_batch=4, opt_batch=2)
    assert not engine.cache_hit and engine.plan_path.is_file() and engine.plan_path.parent == cache
    assert {"tensorrt", "gpu", "plan"} <= set(engine.describe())

    x = torch.randn(6, 1, 8, 8, 8)  # > max_batch: runs in two chunks
    with torch.no_grad():
        want = model(x)
    got = engine(x.cuda())
    assert got.device.type == "cuda" and got.dtype == torch.float32 and got.shape == (6, 3, 8, 8, 8)
    tol = 1e-3 if precision == "fp32" else 2e-2
    np.testing.assert_allclose(got.cpu().numpy(), want.numpy(), atol=tol, rtol=tol)

    mtime = engine.plan_path.stat().st_mtime_ns
    again = TensorRTEngine(path, precision=precision, cache_dir=cache, max_batch=4, opt_batch=2)
    assert again.cache_hit and again.plan_path == engine.plan_path
    assert engine.plan_path.stat().st_mtime_ns == mtime
    torch.testing.assert_close(again(x.cuda()), got, atol=tol, rtol=tol)

    engine.plan_path.write_bytes(b"not a plan")
    rebuilt = TensorRTEngine(path, precision=precision, cache_dir=cache, max_batch=4, opt_batch=2)
    assert not rebuilt.cache_hit
    torch.testing.assert_close(rebuilt(x.cuda()), got, atol=tol, rtol=tol)


@needs_trt
def test_int8_qdq_build_and_run(tiny_qdq_onnx: Path, tmp_path: Path) -> None:
    engine = TensorRTEngine(tiny_qdq_onnx, precision="int8", cache_dir=tmp_path / "cache", max_batch=2, opt_batch=1)
    x = torch.randn(3, 1, 8, 8, 8)
    got = engine(x.cuda()).cpu().numpy()
    # reference: the same QDQ graph on ONNX Runtime CPU (same quantization, other rounding paths)
    import onnxruntime as ort

    session = ort.InferenceSession(str(tiny_qdq_onnx), providers=["CPUExecutionProvider"])
    want = session.run(None, {"input": x.numpy()})[0]
    assert got.shape == want.shape == (3, 3, 8, 8, 8)
    assert np.abs(got - want).max() <= 0.05 * np.abs(want).max() + 1e-3


@needs_trt
def test_int8_needs_a_qdq_onnx(tiny_onnx: tuple[Path, torch.nn.Module], tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match="QDQ"):
        TensorRTEngine(tiny_onnx[0], precision="int8", cache_dir=tmp_path / "cache")
