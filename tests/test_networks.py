"""TransUNet3D and UNesT: shapes, full-size parameter counts, ONNX export with a dynamic batch."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from medptq_monai.networks import TransUNet3D, UNesT
from medptq_monai.networks.unest import blockify, deblockify

# Full default configurations; counts fixed by the architecture (computed on the meta device).
TRANSUNET_FULL_PARAMS = 91_591_630
UNEST_FULL_PARAMS = 87_205_158


def small_transunet() -> TransUNet3D:
    torch.manual_seed(0)
    return TransUNet3D(
        in_channels=1, out_channels=3, img_size=(32, 32, 32), base_channels=4,
        hidden_size=64, num_layers=2, num_heads=4, mlp_dim=128,
    ).eval()


def small_unest() -> UNesT:
    torch.manual_seed(0)
    return UNesT(
        in_channels=1, out_channels=3, img_size=(32, 32, 64), embed_dim=(32, 64, 128),
        depths=(1, 1, 2), num_heads=(2, 4, 4), feature_size=4,
    ).eval()


SMALL = {"transunet": (small_transunet, (32, 32, 32)), "unest": (small_unest, (32, 32, 64))}


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("name", sorted(SMALL))
def test_output_shape(name: str) -> None:
    build, size = SMALL[name]
    net = build()
    with torch.no_grad():
        out = net(torch.rand(2, 1, *size))
    assert out.shape == (2, 3, *size)
    assert torch.isfinite(out).all()


def test_full_size_parameter_counts() -> None:
    with torch.device("meta"):
        transunet = TransUNet3D()
        unest = UNesT()
    assert n_params(transunet) == TRANSUNET_FULL_PARAMS
    assert n_params(unest) == UNEST_FULL_PARAMS
    # the 12 transformer layers dominate TransUNet: 12 x 7,087,872
    assert sum(p.numel() for p in transunet.layers.parameters()) == 12 * 7_087_872
    # post-norm layout drops only the final LayerNorm (2 x 768)
    with torch.device("meta"):
        assert n_params(TransUNet3D(norm_first=False)) == TRANSUNET_FULL_PARAMS - 2 * 768


def test_unest_full_layout_matches_bundle() -> None:
    """Block hierarchy and a few state-dict names/shapes of the whole-brain bundle's network."""
    with torch.device("meta"):
        net = UNesT()
    levels = net.nestViT.levels
    assert [lvl.num_blocks for lvl in levels] == [64, 8, 1]
    assert [lvl.seq_len for lvl in levels] == [216, 216, 216]
    shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert shapes["nestViT.patch_embed.proj.weight"] == (128, 1, 4, 4, 4)
    assert shapes["nestViT.levels.0.pos_embed"] == (1, 64, 216, 128)
    assert shapes["nestViT.levels.2.pool.conv.weight"] == (512, 256, 3, 3, 3)
    assert shapes["nestViT.levels.2.transformer_encoder.7.attn.qkv.weight"] == (1536, 512)
    assert shapes["encoder2.blocks.0.conv.weight"] == (64, 64, 1, 1, 1)
    assert shapes["encoder10.conv.weight"] == (1024, 512, 3, 3, 3)
    assert shapes["decoder5.conv_block.conv1.conv.weight"] == (512, 1024, 3, 3, 3)
    assert shapes["out.conv.conv.weight"] == (133, 32, 1, 1, 1)


def test_blockify_roundtrip_and_order() -> None:
    x = torch.arange(2 * 3 * 4 * 4 * 8, dtype=torch.float32).reshape(2, 3, 4, 4, 8)
    blocks, size = (2, 2, 2), (2, 2, 4)
    b = blockify(x, blocks, size)
    assert b.shape == (2, 8, 16, 3)
    # block 1 is the second block along W; its first token is voxel (0, 0, 4)
    assert torch.equal(b[:, 1, 0, :], x[:, :, 0, 0, 4])
    assert torch.equal(deblockify(b, blocks, size), x)


def _export(net: torch.nn.Module, x: torch.Tensor, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net, x, str(path), dynamo=False, opset_version=17,
            input_names=["input"], output_names=["output"],
            dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
        )


@pytest.mark.parametrize("name", sorted(SMALL))
def test_onnx_export_dynamic_batch(name: str, tmp_path: Path) -> None:
    build, size = SMALL[name]
    net = build()
    torch.manual_seed(1)
    x2 = torch.rand(2, 1, *size)
    path = tmp_path / f"{name}.onnx"
    _export(net, x2[:1], path)

    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    ops = {node.op_type for node in model.graph.node}
    assert {"MatMul", "Softmax", "Conv", "ConvTranspose"} <= ops
    assert not ops & {"Attention", "MultiHeadAttention", "ScaledDotProductAttention"}
    # every reshape uses constants with a free (-1) batch axis: no shape arithmetic in the graph
    assert "Shape" not in ops

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for x in (x2[:1], x2):  # exported at batch 1, run at batch 1 and 2
        with torch.no_grad():
            ref = net(x).numpy()
        got = sess.run(["output"], {"input": x.numpy()})[0]
        assert got.shape == ref.shape
        scale = max(1.0, float(np.abs(ref).max()))
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-4 * scale)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"img_size": (96, 96, 90)}, "divisible by 16"),
        ({"img_size": (96, 96)}, "3 positive ints"),
        ({"hidden_size": 100, "num_heads": 12}, "divisible by num_heads"),
        ({"num_layers": 0}, "num_layers"),
        ({"dropout": 1.5}, "dropout"),
        ({"base_channels": 0}, "base_channels"),
    ],
)
def test_transunet_bad_args(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TransUNet3D(**kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"img_size": (96, 96, 80)}, "divisible by 32"),
        ({"img_size": (32, 32, 32)}, "too small"),
        ({"patch_size": 2}, "patch_size must be 4"),
        ({"embed_dim": (128, 256)}, "3 entries"),
        ({"depths": (2, 0, 8)}, "depths"),
        ({"num_heads": (4, 8, 12)}, "divisible by num_heads"),
        ({"feature_size": -1}, "feature_size"),
        ({"dropout": -0.1}, "dropout"),
    ],
)
def test_unest_bad_args(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        UNesT(**kwargs)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_wrong_input_size_raises(name: str) -> None:
    build, size = SMALL[name]
    net = build()
    with pytest.raises(ValueError, match="expected input"):
        net(torch.rand(1, 1, *(s * 2 for s in size)))
