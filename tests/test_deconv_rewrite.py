"""Stride-2 kernel-2 ConvTranspose → 1x1x1 Conv + depth-to-space: exact in FP32 (ONNX Runtime, no graph
optimisation), per-channel INT8 weights in QDQ files, other ConvTranspose left alone, bad input refused."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from medptq_monai.calibrate.quantize import QuantizeOptions, apply_tensorrt_variants_file, quantize_onnx
from medptq_monai.errors import CalibrationError, ModelFileError
from medptq_monai.export.deconv_rewrite import float_deconv_weights, rewrite_deconv, rewrite_deconv_file
from medptq_monai.export.onnx_model import metadata
from medptq_monai.export.trt_check import check_qdq_for_tensorrt
from medptq_monai.fileio import sha256_file
from medptq_monai.metrics import sqnr_db

from conftest import ct_patches


def _export(module: torch.nn.Module, shape: tuple[int, ...], dynamic_spatial: bool = False) -> onnx.ModelProto:
    spatial = len(shape) - 2
    axes = {"input": {0: "n"}, "output": {0: "n"}}
    if dynamic_spatial:
        axes = {"input": {0: "n", **{2 + i: f"s{i}" for i in range(spatial)}},
                "output": {0: "n", **{2 + i: f"t{i}" for i in range(spatial)}}}
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), torch.randn(*shape), buf, input_names=["input"], output_names=["output"],
                          opset_version=17, dynamo=False, dynamic_axes=axes)
    return onnx.load_from_string(buf.getvalue())


def _run(model: onnx.ModelProto | Path, x: np.ndarray) -> np.ndarray:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]


_CT = {1: torch.nn.ConvTranspose1d, 2: torch.nn.ConvTranspose2d, 3: torch.nn.ConvTranspose3d}


@pytest.mark.parametrize("cin, cout, bias, spatial, dynamic", [
    (1, 1, True, 3, False), (3, 5, False, 3, False), (16, 8, True, 3, True), (32, 64, True, 3, False),
    (7, 2, True, 2, False), (4, 6, False, 1, True),
])
def test_rewrite_is_exact_in_fp32(cin: int, cout: int, bias: bool, spatial: int, dynamic: bool) -> None:
    torch.manual_seed(cin * 100 + cout)
    module = _CT[spatial](cin, cout, 2, stride=2, bias=bias)
    size = (3, 4, 5)[:spatial]
    model = _export(module, (1, cin, *size), dynamic)
    x = np.random.default_rng(cin).standard_normal((2, cin, *size)).astype(np.float32)
    want = _run(model, x)
    report = rewrite_deconv(model)
    onnx.checker.check_model(model, full_check=True)
    assert report.rewritten == ["/ConvTranspose"] and not report.skipped
    ops = [n.op_type for n in model.graph.node]
    assert "ConvTranspose" not in ops and ops.count("Conv") == 1 and ops.count("Transpose") == 1
    assert ("Shape" in ops) == dynamic  # static spatial dims: constant Reshape targets
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    weight = next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == conv.input[1])
    assert weight.shape == (cout * 2 ** spatial, cin, *([1] * spatial))
    got = _run(model, x)
    assert got.shape == want.shape == (2, cout, *[2 * s for s in size])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * float(np.abs(want).max()))
    if dynamic:  # another spatial size through the same graph
        x2 = np.random.default_rng(1).standard_normal((1, cin, *([2] * spatial))).astype(np.float32)
        model0 = _export(module, (1, cin, *size), dynamic)
        want2 = _run(model0, x2)
        np.testing.assert_allclose(_run(model, x2), want2, rtol=0, atol=1e-6 * float(np.abs(want2).max()))


@pytest.mark.parametrize("kwargs, reason", [
    (dict(kernel_size=3, stride=2, padding=1, output_padding=1), "kernel"),  # MONAI UNet's up-convolution
    (dict(kernel_size=2, stride=1), "strides"),
    (dict(kernel_size=2, stride=2, groups=2), "group"),
    (dict(kernel_size=2, stride=2, dilation=2), "dilations"),
    (dict(kernel_size=2, stride=2, output_padding=1), "output_padding"),
    (dict(kernel_size=4, stride=2, padding=1), "kernel"),
])
def test_other_convtranspose_is_left_alone_and_reported(kwargs: dict, reason: str) -> None:
    model = _export(torch.nn.ConvTranspose3d(4, 6, **kwargs), (1, 4, 3, 3, 3))
    before = model.SerializeToString()
    report = rewrite_deconv(model)
    assert report.rewritten == [] and list(report.skipped) == ["/ConvTranspose"]
    assert reason in report.skipped["/ConvTranspose"]
    assert model.SerializeToString() == before


class _Decoder(torch.nn.Module):
    """Conv → LeakyReLU → ConvTranspose3d(k2 s2) → InstanceNorm → Conv, and a MONAI-UNet-style k3 up-conv."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = torch.nn.Conv3d(1, 8, 3, stride=2, padding=1)
        self.act = torch.nn.LeakyReLU(0.01)
        self.up = torch.nn.ConvTranspose3d(8, 6, 2, stride=2)
        self.norm = torch.nn.InstanceNorm3d(6, affine=True)
        self.up3 = torch.nn.ConvTranspose3d(6, 4, 3, stride=2, padding=1, output_padding=1)
        self.head = torch.nn.Conv3d(4, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.up3(self.norm(self.up(self.act(self.enc(x))))))


@pytest.fixture(scope="module")
def decoder_fp32(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from medptq_monai.export.torch_export import export_fp32

    torch.manual_seed(3)
    path = tmp_path_factory.mktemp("deconv") / "decoder_fp32.onnx"
    return export_fp32(_Decoder(), path, 1, (32, 32, 32))


@pytest.fixture(scope="module")
def decoder_int8(decoder_fp32: Path) -> Path:
    out = decoder_fp32.with_name("decoder_int8.onnx")
    quantize_onnx(decoder_fp32, out, ct_patches(4), QuantizeOptions(calibrator="max"))
    return out


def _conv_weight_dq(model: onnx.ModelProto, conv_name_part: str) -> tuple[onnx.NodeProto, np.ndarray, np.ndarray]:
    conv = next(n for n in model.graph.node if n.op_type == "Conv" and conv_name_part in n.name)
    dq = next(n for n in model.graph.node if n.output and n.output[0] == conv.input[1])
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return dq, inits[dq.input[0]], inits[dq.input[1]]


def test_quantize_with_rewrite_gives_per_channel_int8_conv(decoder_fp32: Path, decoder_int8: Path,
                                                           tmp_path: Path) -> None:
    out = tmp_path / "rewritten.onnx"
    res = quantize_onnx(decoder_fp32, out, ct_patches(4), QuantizeOptions(calibrator="max", rewrite_deconv=True))
    model = onnx.load(str(out))
    assert check_qdq_for_tensorrt(model) == []
    types = [n.op_type for n in model.graph.node]
    assert types.count("ConvTranspose") == 1  # the kernel-3 one stays
    dq, q, scale = _conv_weight_dq(model, "Conv1x1")
    assert q.dtype == np.int8 and q.shape == (6 * 8, 8, 1, 1, 1) and scale.shape == (48,)
    assert [a.i for a in dq.attribute if a.name == "axis"] == [0]
    assert len(np.unique(scale)) > 1  # requantized per output channel from the FP32 weights
    assert np.abs(q).max(axis=(1, 2, 3, 4)).min() == 127  # each channel uses the full int8 range
    meta = metadata(model)
    assert meta["medptq.deconv_rewritten"] == "1" and "ConvTranspose" in meta["medptq.deconv_skipped"]
    assert res.metadata["medptq.high_precision"] == "fp32"
    # same network, same activation ranges: the rewritten file is at least as close to FP32 on held-out CT
    x = np.concatenate(ct_patches(2, seed=9))
    ref = _run(decoder_fp32, x)
    assert sqnr_db(ref, _run(out, x)) >= sqnr_db(ref, _run(decoder_int8, x)) - 0.5


def test_rewrite_of_an_int8_file_without_fp32_reproduces_it(decoder_int8: Path, tmp_path: Path) -> None:
    """Without FP32 weights the file's own int8 values and per-tensor scale are kept: the same numbers."""
    out = tmp_path / "kept.onnx"
    report = rewrite_deconv_file(decoder_int8, out)
    assert len(report.rewritten) == 1 and not report.requantized
    model = onnx.load(str(out))
    assert check_qdq_for_tensorrt(model) == []
    _, _, scale = _conv_weight_dq(model, "Conv1x1")
    assert scale.shape == (48,) and len(np.unique(scale)) == 1
    x = np.concatenate(ct_patches(2, seed=9))
    want = _run(decoder_int8, x)
    np.testing.assert_allclose(_run(out, x), want, rtol=0, atol=1e-5 * float(np.abs(want).max()))


def test_file_variant_in_place_and_bad_input(decoder_fp32: Path, decoder_int8: Path, tmp_path: Path) -> None:
    target = tmp_path / "int8.onnx"
    target.write_bytes(decoder_int8.read_bytes())
    meta = apply_tensorrt_variants_file(target, rewrite_deconv=True, fp32_path=decoder_fp32)
    assert meta["medptq.deconv_rewritten"] == "1"
    digest = sha256_file(target)
    with pytest.raises(CalibrationError, match="already carries"):  # a second pass is refused, file untouched
        apply_tensorrt_variants_file(target, rewrite_deconv=True, fp32_path=decoder_fp32)
    assert sha256_file(target) == digest
    # no stride-2 kernel-2 ConvTranspose left: specific error, nothing written
    with pytest.raises(ModelFileError, match="no stride-2 kernel-2"):
        rewrite_deconv_file(target, tmp_path / "none.onnx")
    # an FP32 "source" whose weights do not fit the file
    other = _export(torch.nn.Sequential(torch.nn.Conv3d(1, 8, 3, stride=2, padding=1),
                                        torch.nn.ConvTranspose3d(8, 5, 2, stride=2)), (1, 1, 8, 8, 8))
    wrong = float_deconv_weights(other)
    model = onnx.load(str(decoder_int8))
    name = next(n.name for n in model.graph.node if n.op_type == "ConvTranspose" and "up/" in n.name)
    with pytest.raises(ModelFileError, match="not the FP32 source"):
        rewrite_deconv(model, {name: next(iter(wrong.values()))})
    with pytest.raises(ModelFileError, match="not found"):
        rewrite_deconv_file(tmp_path / "missing.onnx", tmp_path / "out.onnx")
    assert not (tmp_path / "none.onnx").exists() and not (tmp_path / "out.onnx").exists()
