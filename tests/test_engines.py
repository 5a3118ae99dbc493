import logging

import numpy as np
import pytest
import torch

from medptq_monai.engines import create_engine
from medptq_monai.engines.onnxruntime_engine import OnnxRuntimeEngine
from medptq_monai.engines.openvino_engine import OpenVinoEngine
from medptq_monai.errors import EngineUnavailableError, InputImageError, ModelFileError, UnknownNameError

from conftest import TENSORRT_REASON, TENSORRT_USABLE, ct_patches, needs_no_tensorrt, small_unet


@pytest.fixture(scope="module")
def batch():
    return torch.from_numpy(np.concatenate(ct_patches(3, seed=7)))


@pytest.fixture(scope="module")
def reference(batch):
    with torch.no_grad():
        return small_unet()(batch)


@pytest.mark.parametrize("name", ["onnxruntime", "openvino"])
def test_fp32_engines_match_torch(name, small_fp32, batch, reference):
    engine = create_engine(name, small_fp32, "fp32")
    out = engine(batch)
    assert out.shape == reference.shape and out.dtype == torch.float32
    assert torch.allclose(out, reference, atol=1e-3, rtol=1e-3)
    assert engine.describe()["engine"] == name and engine.precision == "fp32"


@pytest.mark.parametrize("name", ["onnxruntime", "openvino"])
def test_int8_engines_are_close_to_fp32_and_batch_independent(name, small_int8, batch, reference):
    engine = create_engine(name, small_int8, "int8")
    out = engine(batch)
    singles = torch.cat([engine(batch[i : i + 1]) for i in range(batch.shape[0])])
    assert torch.allclose(out, singles, atol=1e-4)
    err = (out - reference).abs().max() / reference.abs().max()
    assert err < 0.1, f"{name} INT8 relative max error {err:.3f}"
    agree = (out.argmax(1) == reference.argmax(1)).float().mean()
    assert agree > 0.9


def test_openvino_runs_convolutions_in_int8(small_int8):
    precisions = OpenVinoEngine(small_int8, "int8").runtime_precisions()
    conv = {prec: n for (layer, prec), n in precisions.items() if layer in ("Convolution", "Deconvolution")}
    assert conv and set(conv) <= {"u8", "i8"}, precisions
    fp32 = {p for (layer, p) in OpenVinoEngine(small_int8.with_name("small_fp32.onnx"), "fp32").runtime_precisions()
            if layer == "Convolution"}
    assert fp32 == {"f32"}


def test_torch_engine_loads_the_checkpoint(tmp_path, batch, reference):
    ckpt = tmp_path / "model.pt"
    torch.save(small_unet().state_dict(), ckpt)
    engine = create_engine("torch", None, "fp32", torch_network=small_unet().train(), checkpoint=ckpt,
                           in_channels=1, num_classes=3)
    assert torch.allclose(engine(batch), reference, atol=1e-5)


@pytest.mark.parametrize("name", ["onnxruntime", "openvino"])
def test_wrong_rank_and_channels_are_clear_errors(name, small_int8):
    engine = create_engine(name, small_int8, "int8")
    with pytest.raises(InputImageError, match="5D"):
        engine(torch.zeros(1, 32, 32, 32))
    with pytest.raises(InputImageError, match="channel"):
        engine(torch.zeros(1, 2, 32, 32, 32))
    with pytest.raises(InputImageError, match="patches"):
        engine(torch.zeros(1, 1, 16, 32, 32))


@pytest.mark.parametrize("cls", [OnnxRuntimeEngine, OpenVinoEngine])
def test_missing_and_corrupt_model_files(cls, tmp_path, small_int8):
    with pytest.raises(ModelFileError, match="not found"):
        cls(tmp_path / "nope.onnx")
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    with pytest.raises(ModelFileError, match="empty"):
        cls(empty)
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(small_int8.read_bytes()[:5000])
    with pytest.raises(ModelFileError, match="corrupt"):
        cls(corrupt)


def test_unknown_engine_and_precision(small_int8):
    with pytest.raises(UnknownNameError, match="tensorflow"):
        create_engine("tensorflow", small_int8)
    with pytest.raises(UnknownNameError, match="int4"):
        create_engine("openvino", small_int8, "int4")


@needs_no_tensorrt
def test_tensorrt_requested_without_tensorrt_is_a_clear_error(small_int8):
    with pytest.raises(EngineUnavailableError) as err:
        create_engine("tensorrt", small_int8, "int8")
    assert TENSORRT_REASON and TENSORRT_REASON in str(err.value)  # the reason this machine has


@needs_no_tensorrt
def test_auto_falls_back_to_a_cpu_engine_with_a_warning(small_int8, caplog):
    with caplog.at_level(logging.WARNING, logger="medptq_monai.engines"):
        engine = create_engine("auto", small_int8, "int8", device="cuda")
    assert engine.name == "openvino" and engine.device.type == "cpu"
    assert any("falling back" in r.message and TENSORRT_REASON in r.message for r in caplog.records)


@pytest.mark.skipif(not TENSORRT_USABLE, reason=f"TensorRT is not usable here: {TENSORRT_REASON}")
def test_auto_takes_tensorrt_when_usable(small_int8):
    engine = create_engine("auto", small_int8, "int8", device="cuda")
    assert engine.name == "tensorrt" and engine.device.type == "cuda"


class _ConcatConv(torch.nn.Module):
    """The smallest model OpenVINO 2026.4 gets wrong in INT8: two convolutions, Concat, convolution."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Conv3d(1, 16, 3, padding=1)
        self.b = torch.nn.Conv3d(1, 8, 3, padding=1)
        self.c = torch.nn.Conv3d(24, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.cat([self.a(x), torch.nn.functional.leaky_relu(self.b(x))], 1))


@pytest.fixture(scope="module")
def concat_conv(tmp_path_factory):
    from medptq_monai.calibrate.quantize import QuantizeOptions, quantize_onnx
    from medptq_monai.export.torch_export import export_fp32

    torch.manual_seed(0)
    net = _ConcatConv().eval()
    work = tmp_path_factory.mktemp("concat_conv")
    fp32, int8 = work / "fp32.onnx", work / "int8.onnx"
    export_fp32(net, fp32, 1, (16, 16, 16))
    patches = [(p - 0.3) / 0.3 for p in ct_patches(4, seed=3, roi=(16, 16, 16))]
    quantize_onnx(fp32, int8, patches, QuantizeOptions(calibrator="max"))
    x = torch.from_numpy(np.concatenate(ct_patches(2, seed=9, roi=(16, 16, 16))) - 0.3) / 0.3
    with torch.no_grad():
        return int8, x, net(x)


def test_split_concat_convolutions_keeps_the_qdq_arithmetic(concat_conv, tmp_path):
    import onnx

    from medptq_monai.engines.concat_conv import split_concat_convolutions

    int8, x, _ = concat_conv
    model = onnx.load(str(int8))
    assert split_concat_convolutions(model) == 1
    assert not [n for n in model.graph.node if n.op_type == "Concat"]  # the Concat had no other reader
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    assert len(convs) == 4 and sum(n.op_type == "Add" for n in model.graph.node) == 1
    onnx.checker.check_model(model)
    assert split_concat_convolutions(model) == 0  # nothing left to split
    onnx.save(model, tmp_path / "split.onnx")
    import onnxruntime as ort

    plain = ort.SessionOptions()  # the graph as written: no fused int8 kernels with their own rounding
    plain.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    before, after = (ort.InferenceSession(str(p), plain).run(None, {"input": x.numpy()})[0]
                     for p in (int8, tmp_path / "split.onnx"))
    assert np.allclose(before, after, atol=1e-5 * float(np.abs(before).max()))


def test_openvino_int8_convolution_after_concat_matches_onnxruntime(concat_conv):
    from medptq_monai.metrics import sqnr_db

    int8, x, reference = concat_conv
    ov_engine = OpenVinoEngine(int8, "int8")
    assert ov_engine.describe()["split_concat_convolutions"] == "1"
    ort_db = sqnr_db(reference.numpy(), OnnxRuntimeEngine(int8, "int8")(x).numpy())
    ov_db = sqnr_db(reference.numpy(), ov_engine(x).numpy())
    assert ort_db > 25.0 and abs(ov_db - ort_db) < 1.0, (ort_db, ov_db)  # unsplit, OpenVINO gave ~6 dB
