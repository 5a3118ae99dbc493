"""Vista3DSegmenter: VISTA3D's class-prompt path as image -> logits, ONNX export, point prompts, bundle configs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from monai.networks.nets import vista3d132
from monai.networks.nets.vista3d import VISTA3D

from medptq_monai.calibrate.quantize import QuantizeOptions, quantize_onnx
from medptq_monai.errors import InputImageError
from medptq_monai.export.torch_export import export_fp32
from medptq_monai.networks.vista3d import (
    BTCV13_VISTA3D_CLASS_IDS,
    PointPromptError,
    Vista3DSegmenter,
)

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "bundles" / "vista3d_int8"
DIM = 8
ROI = (32, 32, 32)


@pytest.fixture(scope="module")
def net() -> Vista3DSegmenter:
    torch.manual_seed(0)
    return Vista3DSegmenter(encoder_embed_dim=DIM).eval()


@pytest.fixture(scope="module")
def batch() -> torch.Tensor:
    return torch.rand(4, 1, *ROI, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def exported(net, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("vista3d") / "vista3d_fp32.onnx"
    export_fp32(net, path, 1, ROI)
    return path


def test_output_shape_and_background_channel(net, batch) -> None:
    with torch.no_grad():
        out = net(batch[:2])
    assert out.shape == (2, 1 + len(BTCV13_VISTA3D_CLASS_IDS), *ROI) and net.num_classes == 14
    assert torch.isfinite(out).all()
    assert torch.count_nonzero(out[:, 0]) == 0
    # argmax is background exactly where no class passes VISTA3D's sigmoid > 0.5 rule
    label = out.argmax(1)
    assert torch.equal(label == 0, (out[:, 1:].sigmoid() <= 0.5).all(1))


def test_batch_matches_single_images(net, batch) -> None:
    with torch.no_grad():
        whole = net(batch)
        single = net(batch[2:3])
        pair = net(batch[:2])
    torch.testing.assert_close(whole[2:3], single, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(whole[:2], pair, rtol=1e-4, atol=1e-4)


def test_official_vista3d_state_dict_loads_and_matches_class_prompts(net, batch) -> None:
    torch.manual_seed(3)
    official = vista3d132(encoder_embed_dim=DIM).eval()  # built the MONAI way
    mine = Vista3DSegmenter(encoder_embed_dim=DIM).eval()
    assert list(mine.state_dict()) == list(official.state_dict())
    mine.load_state_dict(official.state_dict(), strict=True)
    classes = torch.tensor(BTCV13_VISTA3D_CLASS_IDS).unsqueeze(1)
    with torch.no_grad():
        ref = official(batch[:2], class_vector=classes, transpose=True)  # [B, K, *roi]
        out = mine(batch[:2])
    torch.testing.assert_close(out[:, 1:], ref, rtol=1e-4, atol=1e-4)


def test_full_size_layout_is_vista3d132() -> None:
    with torch.device("meta"):
        official, mine = vista3d132(), Vista3DSegmenter()
    shapes = {k: tuple(v.shape) for k, v in official.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in mine.state_dict().items()} == shapes
    assert sum(p.numel() for p in mine.parameters()) == 217_964_982
    assert mine.shape_factor == (16, 16, 16)


def test_onnx_export_runs_in_onnxruntime_at_batch_1_and_4(net, batch, exported) -> None:
    model = onnx.load(str(exported))
    inits = {i.name for i in model.graph.initializer}
    logit_conv = [n for n in model.graph.node if n.name == "/class_logits/Conv"]
    assert logit_conv and logit_conv[0].input[1] in inits, "class kernel must be a Conv weight initializer"
    session = ort.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        ref = net(batch).numpy()
    for n in (1, 4):
        got = session.run(None, {"input": batch[:n].numpy()})[0]
        assert got.shape == (n, 14, *ROI)
        np.testing.assert_allclose(got, ref[:n], rtol=1e-3, atol=1e-3)


def test_onnx_quantizes_encoder_and_class_head(exported, batch, tmp_path) -> None:
    patches = [batch[i : i + 1].numpy() for i in range(2)]
    result = quantize_onnx(exported, tmp_path / "int8.onnx", patches, QuantizeOptions(calibrator="max"))
    assert "/class_logits/Conv" in result.quantized_nodes
    assert any(n.startswith("/image_encoder/") for n in result.quantized_nodes)
    session = ort.InferenceSession(str(tmp_path / "int8.onnx"), providers=["CPUExecutionProvider"])
    assert session.run(None, {"input": batch.numpy()})[0].shape == (4, 14, *ROI)


def test_point_prompt_returns_masks_of_the_image_shape(net) -> None:
    image = torch.rand(1, 1, 20, 30, 16, generator=torch.Generator().manual_seed(2))  # padded to 32x32x16 inside
    logits = net.point_prompt(image, [[[10, 10, 10], [15, 5, 7]], [[3, 4, 5], [-1, -1, -1]]], [[1, 0], [1, -1]],
                              prompt_class=[3, 24], return_logits=True)
    assert logits.shape == (2, 1, 20, 30, 16) and logits.dtype == torch.float32 and torch.isfinite(logits).all()
    # on a size the encoder takes as is, it is exactly VISTA3D's own point path
    exact = torch.rand(1, 1, 32, 16, 16, generator=torch.Generator().manual_seed(4))
    coords, labels = torch.tensor([[[5.0, 6.0, 7.0]]]), torch.tensor([[1]])
    mask = net.point_prompt(exact, coords[0], labels[0])
    assert mask.shape == (1, 1, 32, 16, 16) and mask.dtype == torch.uint8
    with torch.no_grad():
        ref = VISTA3D.forward(net, exact, point_coords=coords, point_labels=labels)
    assert torch.equal(mask, (ref > 0).to(torch.uint8))


@pytest.mark.parametrize("shape, match", [
    ((1, 2, 32, 32, 32), "must be [B, 1, D, H, W]"),
    ((32, 32, 32), "must be [B, 1, D, H, W]"),
    ((1, 1, 30, 32, 32), "divisible by [16, 16, 16]"),
    ((1, 1, 16, 16, 16), "too small"),
])
def test_bad_images_are_refused(net, shape, match) -> None:
    with pytest.raises(InputImageError, match=match.replace("[", r"\[").replace("]", r"\]")):
        net(torch.rand(*shape))


def test_bad_construction_and_point_prompts_are_refused(net) -> None:
    with pytest.raises(ValueError, match="multiple of 8"):
        Vista3DSegmenter(encoder_embed_dim=12)
    with pytest.raises(ValueError, match="must not repeat"):
        Vista3DSegmenter(encoder_embed_dim=8, class_ids=[1, 1])
    with pytest.raises(ValueError, match="< 512"):
        Vista3DSegmenter(encoder_embed_dim=8, class_ids=[600])
    image = torch.rand(1, 1, 32, 32, 32)
    cases = [
        (dict(point_coords=[[40, 1, 1]], point_labels=[1]), PointPromptError, "outside the image"),
        (dict(point_coords=[[1, 1, 1]], point_labels=[-1]), PointPromptError, "at least one point"),
        (dict(point_coords=[[1, 1]], point_labels=[1]), PointPromptError, r"\[N, 3\]"),
        (dict(point_coords=[[1, 1, 1]], point_labels=[7]), PointPromptError, "point_labels must be in"),
        (dict(point_coords=[[1, 1, 1]], point_labels=[1], prompt_class=[3, 4]), PointPromptError, "one non-negative"),
    ]
    for kwargs, kind, match in cases:
        with pytest.raises(kind, match=match):
            net.point_prompt(image, **kwargs)
    with pytest.raises(InputImageError, match="one image per point prompt"):
        net.point_prompt(torch.rand(2, 1, 32, 32, 32), [[1, 1, 1]], [1])
    with pytest.raises(InputImageError, match="too small"):
        net.point_prompt(torch.rand(1, 1, 10, 16, 12), [[1, 1, 1]], [1])
    with pytest.raises(InputImageError, match="NaN"):
        net.point_prompt(torch.full((1, 1, 32, 32, 32), float("nan")), [[1, 1, 1]], [1])


def test_bundle_configs_build_the_network_with_unet_label_order() -> None:
    from medptq_monai.bundle.runner import bundle_parser

    full = bundle_parser(BUNDLE, ["inference.json"])
    small = bundle_parser(BUNDLE, ["inference.json", "small.json"])
    unet = bundle_parser(ROOT / "bundles" / "unet_int8", ["inference.json"])
    assert full.get_parsed_content("label_map") == unet.get_parsed_content("label_map")
    assert full.get_parsed_content("class_ids") == list(BTCV13_VISTA3D_CLASS_IDS)
    assert full.get_parsed_content("num_classes") == 1 + len(BTCV13_VISTA3D_CLASS_IDS)
    assert full.get_parsed_content("roi_size") == [128, 128, 128]
    assert full["network_def"]["encoder_embed_dim"] == 48
    meta = full.get_parsed_content("_meta_")
    unet_meta = unet.get_parsed_content("_meta_")
    channels = meta["network_data_format"]["outputs"]["pred"]["channel_def"]
    assert channels == unet_meta["network_data_format"]["outputs"]["pred"]["channel_def"]
    network = small.get_parsed_content("network_def")
    assert isinstance(network, Vista3DSegmenter) and network.encoder_embed_dim == DIM
    assert small.get_parsed_content("roi_size") == [64, 64, 64]
    assert small.get_parsed_content("models_dir").endswith("models/small")
