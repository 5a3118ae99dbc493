"""nnU-Net v2: networks from plans files, the nnunet_int8 bundle's preprocessing, importing a results folder."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet

from medptq_monai.bundle.nnunet_import import BundleExistsError, import_nnunet, load_nnunet_checkpoint
from medptq_monai.bundle.runner import bundle_parser
from medptq_monai.errors import ModelFileError
from medptq_monai.export.torch_export import load_checkpoint
from medptq_monai.networks.nnunet import load_plan, network_from_plans

from conftest import DATA, ROOT

BUNDLE = ROOT / "bundles" / "nnunet_int8"
SMALL_CT = DATA / "images_small" / "abdomen_ct_small.nii.gz"
LABELS = ["background", "liver", "spleen"]
TRANSPOSE = [2, 0, 1]  # not the identity, so the axis bookkeeping is exercised
SPACING = [6.0, 9.0, 7.5]  # nnU-Net order (after transpose_forward)


def tiny_plans(features=(4, 8, 16), patch=(16, 8, 16), spacing=SPACING, transpose=TRANSPOSE) -> dict:
    """An nnU-Net v2 plans dict with one small 3D PlainConvUNet configuration, '3d_fullres'."""
    n = len(features)
    arch = {
        "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
        "arch_kwargs": {
            "n_stages": n, "features_per_stage": list(features), "conv_op": "torch.nn.modules.conv.Conv3d",
            "kernel_sizes": [[3, 3, 3]] * n, "strides": [[1, 1, 1]] + [[2, 2, 2]] * (n - 1),
            "n_conv_per_stage": [2] * n, "n_conv_per_stage_decoder": [2] * (n - 1), "conv_bias": True,
            "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d", "norm_op_kwargs": {"eps": 1e-5, "affine": True},
            "dropout_op": None, "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
            "nonlin_kwargs": {"inplace": True},
        },
        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
    }
    return {
        "dataset_name": "Dataset123_Tiny", "plans_name": "nnUNetPlans",
        "transpose_forward": list(transpose), "transpose_backward": [int(i) for i in np.argsort(transpose)],
        "configurations": {"3d_fullres": {
            "patch_size": list(patch), "spacing": list(spacing), "normalization_schemes": ["CTNormalization"],
            "use_mask_for_norm": [False], "architecture": arch, "batch_dice": True,
        }},
        "foreground_intensity_properties_per_channel": {"0": {
            "max": 300.0, "mean": 40.0, "median": 45.0, "min": -200.0,
            "percentile_00_5": -100.0, "percentile_99_5": 200.0, "std": 50.0}},
    }


def dataset_json(labels=LABELS) -> dict:
    return {"channel_names": {"0": "CT"}, "labels": {n: i for i, n in enumerate(labels)}, "numTraining": 2,
            "file_ending": ".nii.gz"}


def write_results(root: Path, plans: dict | None = None, weights: dict | None = None, ds: dict | None = None,
                  extra: dict | None = None) -> Path:
    """An nnU-Net v2 results folder with fold_0/checkpoint_final.pth in nnU-Net's own checkpoint layout."""
    plans = plans or tiny_plans()
    ds = ds or dataset_json()
    results = root / "Dataset123_Tiny" / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    (results / "fold_0").mkdir(parents=True)
    (results / "plans.json").write_text(json.dumps(plans))
    (results / "dataset.json").write_text(json.dumps(ds))
    if weights is None:
        torch.manual_seed(0)
        weights = network_from_plans(plans, "3d_fullres", 1, len(ds["labels"]), deep_supervision=True).state_dict()
    ckpt = {
        "network_weights": weights,
        "optimizer_state": {"state": {}, "param_groups": [{"lr": 0.01, "momentum": 0.99, "params": [0, 1]}]},
        "grad_scaler_state": None,
        "logging": {"mean_fg_dice": [np.float64(0.5), np.float64(0.6)], "ema_fg_dice": [np.float64(0.55)],
                    "lrs": [0.01, 0.0099], "epoch_start_timestamps": [1.0e9, 1.1e9]},
        "_best_ema": np.float64(0.55),
        "current_epoch": 2,
        "init_args": {"plans": plans, "configuration": "3d_fullres", "fold": 0, "dataset_json": ds,
                      "device": torch.device("cpu")},
        "trainer_name": "nnUNetTrainer",
        "inference_allowed_mirroring_axes": (0, 1, 2),
        **(extra or {}),
    }
    torch.save(ckpt, results / "fold_0" / "checkpoint_final.pth")
    return results


# ---------------------------------------------------------------- plans -> network


def test_network_from_plans_is_dna_plainconvunet():
    plans = tiny_plans()
    net = network_from_plans(plans, "3d_fullres", in_channels=1, num_classes=3)
    own = PlainConvUNet(1, 3, [4, 8, 16], torch.nn.Conv3d, 3, [1, 2, 2], 2, 3, 2, conv_bias=True,
                        norm_op=torch.nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5, "affine": True},
                        nonlin=torch.nn.LeakyReLU, nonlin_kwargs={"inplace": True})
    assert type(net) is PlainConvUNet and not net.decoder.deep_supervision
    ours, theirs = net.state_dict(), own.state_dict()
    assert list(ours) == list(theirs)
    assert all(ours[k].shape == theirs[k].shape for k in ours)
    assert any(isinstance(m, torch.nn.InstanceNorm3d) for m in net.modules())
    assert any(isinstance(m, torch.nn.LeakyReLU) for m in net.modules())
    with torch.no_grad():
        out = net.eval()(torch.zeros(2, 1, 16, 8, 16))
    assert isinstance(out, torch.Tensor) and tuple(out.shape) == (2, 3, 16, 8, 16)  # one full-resolution output


def test_older_flat_plans_keys_build_the_same_network():
    new = tiny_plans()
    old = copy.deepcopy(new)
    config = old["configurations"]["3d_fullres"]
    kwargs = config.pop("architecture")["arch_kwargs"]
    config.update({"UNet_class_name": "PlainConvUNet", "UNet_base_num_features": 4, "unet_max_num_features": 16,
                   "n_conv_per_stage_encoder": kwargs["n_conv_per_stage"],
                   "n_conv_per_stage_decoder": kwargs["n_conv_per_stage_decoder"],
                   "conv_kernel_sizes": kwargs["kernel_sizes"], "pool_op_kernel_sizes": kwargs["strides"],
                   "num_pool_per_axis": [2, 2, 2]})
    a = network_from_plans(new, "3d_fullres", 1, 3).state_dict()
    b = network_from_plans(old, "3d_fullres", 1, 3).state_dict()
    assert list(a) == list(b) and all(a[k].shape == b[k].shape for k in a)


def test_shipped_plans_full_and_small_configurations():
    full = load_plan(BUNDLE / "configs" / "plans.json", "3d_fullres")
    assert full.arch_kwargs["features_per_stage"] == [32, 64, 128, 256, 320, 320] and full.num_stages == 6
    assert full.patch_size == [128, 128, 128]
    small = load_plan(BUNDLE / "configs" / "plans.json", "3d_small")  # inherits from 3d_fullres
    assert small.arch_kwargs["features_per_stage"] == [8, 16, 32, 64]
    assert small.normalization_schemes == ["CTNormalization"]
    meta = json.loads((BUNDLE / "configs" / "metadata.json").read_text())
    assert meta["network_data_format"]["outputs"]["pred"]["num_channels"] == 14
    parser = bundle_parser(BUNDLE, ["inference.json", "small.json"])
    assert parser.get_parsed_content("configuration") == "3d_small"
    load_checkpoint(parser.get_parsed_content("network_def"), parser.get_parsed_content("checkpoint"))  # strict


def test_preprocessing_gives_nnunet_axis_order_and_ct_normalization(tmp_path):
    """With the plans spacing equal to the image's, the bundle's preprocessed image is nnU-Net's array:
    SimpleITK order (z, y, x) of the voxel grid, permuted by transpose_forward, CT-normalized."""
    rng = np.random.default_rng(0)
    arr = rng.integers(-300, 400, size=(7, 5, 6)).astype(np.int16)  # nibabel (x, y, z)
    voxel = (2.0, 3.0, 4.0)  # x, y, z
    affine = np.diag([-voxel[0], voxel[1], voxel[2], 1.0])  # LAS-like: no reorientation must happen
    (tmp_path / "img").mkdir()
    nib.save(nib.Nifti1Image(arr, affine), str(tmp_path / "img" / "case.nii.gz"))
    sitk_spacing = voxel[::-1]  # (z, y, x)
    plans = tiny_plans(spacing=[sitk_spacing[t] for t in TRANSPOSE], patch=(8, 8, 8))
    bundle = tmp_path / "bundle"
    (bundle / "configs").mkdir(parents=True)
    for name in ("inference.json", "metadata.json"):
        (bundle / "configs" / name).write_text((BUNDLE / "configs" / name).read_text())
    (bundle / "configs" / "plans.json").write_text(json.dumps(plans))
    parser = bundle_parser(bundle, ["inference.json"], dataset_dir=str(tmp_path / "img"))
    got = np.asarray(parser.get_parsed_content("dataset")[0]["image"])[0]
    nnunet = np.transpose(arr, (2, 1, 0)).transpose(TRANSPOSE).astype(np.float64)  # nnU-Net's array
    nnunet = (np.clip(nnunet, -100.0, 200.0) - 40.0) / 50.0  # CTNormalization
    assert got.shape == nnunet.shape
    np.testing.assert_allclose(got, nnunet, atol=1e-4)


@pytest.mark.parametrize("edit, match", [
    (lambda p: p.pop("configurations"), "no 'configurations'"),
    (lambda p: p["configurations"]["3d_fullres"]["architecture"].update(network_class_name="nnunetv2.Foo"),
     "unsupported nnU-Net network class"),
    (lambda p: p["configurations"]["3d_fullres"].update(patch_size=[64, 64]), "only 3D"),
    (lambda p: p.update(transpose_forward=[0, 0, 1]), "permutation"),
    (lambda p: p["configurations"]["3d_fullres"].update(patch_size=[18, 8, 16]), "not a multiple"),
    (lambda p: p["configurations"]["3d_fullres"].update(inherits_from="3d_lowres"), "inherits from unknown"),
])
def test_invalid_plans_give_specific_errors(edit, match):
    plans = tiny_plans()
    edit(plans)
    with pytest.raises(ModelFileError, match=match):
        load_plan(plans, "3d_fullres")


def test_missing_plans_unknown_configuration_and_non_ct(tmp_path):
    with pytest.raises(ModelFileError, match="plans file not found"):
        load_plan(tmp_path / "plans.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ModelFileError, match="not valid JSON"):
        load_plan(tmp_path / "bad.json")
    with pytest.raises(ModelFileError, match=r"unknown nnU-Net configuration '2d'.*\['3d_fullres'\]"):
        load_plan(tiny_plans(), "2d")
    plans = tiny_plans()
    plans["configurations"]["3d_fullres"]["normalization_schemes"] = ["ZScoreNormalization"]
    with pytest.raises(ModelFileError, match="CTNormalization"):
        load_plan(plans).ct_scale_range()


# ---------------------------------------------------------------- importing a results folder


def _no_leftovers(parent: Path, dest: Path) -> None:
    assert not dest.exists(), "a failed import must not create the bundle"
    assert not [p for p in parent.iterdir() if p.name.startswith(".")], "temporary folders left behind"


def test_import_results_folder_gives_a_running_bundle(tmp_path):
    results = write_results(tmp_path / "nnUNet_results")
    weights = load_nnunet_checkpoint(results / "fold_0" / "checkpoint_final.pth")["network_weights"]
    dest = tmp_path / "out" / "my_nnunet"
    summary = import_nnunet(results, dest, fold=0)
    assert summary["num_classes"] == 3 and summary["in_channels"] == 1 and summary["labels"] == LABELS
    assert summary["patch_size"] == [16, 8, 16] and summary["configuration"] == "3d_fullres"
    assert summary["trainer"] == "nnUNetTrainer" and summary["epochs_trained"] == 2
    assert summary["pixdim"] == [6.0, 7.5, 9.0]  # spacing on the image's own (x, y, z) axes
    for name in ("plans.json", "dataset.json"):
        assert (dest / "configs" / name).read_bytes() == (results / name).read_bytes()
    assert not (dest / "configs" / "small.json").exists() and not (dest / "models" / "small").exists()
    state = torch.load(dest / "models" / "model.pt", weights_only=True)
    assert list(state) == list(weights) and all(torch.equal(state[k], weights[k]) for k in state)
    meta = json.loads((dest / "configs" / "metadata.json").read_text())
    fmt = meta["network_data_format"]
    assert fmt["outputs"]["pred"]["num_channels"] == 3 and fmt["inputs"]["image"]["num_channels"] == 1
    assert fmt["outputs"]["pred"]["channel_def"] == {"0": "background", "1": "liver", "2": "spleen"}
    assert fmt["inputs"]["image"]["channel_def"] == {"0": "CT"}
    assert fmt["inputs"]["image"]["spatial_shape"] == [16, 8, 16] and meta["name"] == "my_nnunet"
    assert meta["nnunet"]["checkpoint_sha256"] == summary["checkpoint_sha256"]
    inference = json.loads((dest / "configs" / "inference.json").read_text())
    assert inference["configuration"] == "3d_fullres" and inference["label_map"] is None
    assert (dest / "configs" / "inference_int8.json").is_file()  # the same INT8 overlay as every bundle

    # MONAI's own runner, the bundle's plain inference.json (FP32 torch): the output keeps the input's shape and affine
    out = tmp_path / "seg"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(dest / "configs" / "inference.json"),
         "--bundle_root", str(dest), "--dataset_dir", str(SMALL_CT.parent), "--output_dir", str(out),
         "--inferer#progress", "False"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    seg, src = nib.load(str(out / "abdomen_ct_small_seg.nii.gz")), nib.load(str(SMALL_CT))
    assert seg.shape == src.shape
    np.testing.assert_allclose(seg.affine, src.affine, atol=1e-4)
    assert set(np.unique(np.asarray(seg.dataobj))) <= {0, 1, 2}


def test_import_fills_missing_deep_supervision_heads(tmp_path):
    plans = tiny_plans()
    torch.manual_seed(0)
    weights = network_from_plans(plans, "3d_fullres", 1, 3).state_dict()
    weights = {k: v for k, v in weights.items() if not k.startswith("decoder.seg_layers.0.")}
    results = write_results(tmp_path, plans=plans, weights=weights)
    summary = import_nnunet(results, tmp_path / "b")
    assert summary["deep_supervision_keys_filled"] == 2  # weight + bias of the unused low-resolution head


def test_import_needs_allow_pickle_for_foreign_objects(tmp_path):
    results = write_results(tmp_path, extra={"note": Path("x")})  # a class weights_only refuses
    with pytest.raises(ModelFileError, match="allow_pickle=True"):
        import_nnunet(results, tmp_path / "b")
    _no_leftovers(tmp_path, tmp_path / "b")
    assert import_nnunet(results, tmp_path / "b", allow_pickle=True)["num_classes"] == 3


@pytest.mark.parametrize("case", ["no_plans", "wrong_fold", "missing_checkpoint", "mismatched_checkpoint",
                                  "classes_differ", "not_a_checkpoint", "wrong_configuration", "region_labels"])
def test_import_bad_inputs_write_nothing(tmp_path, case):
    root = tmp_path / "nnUNet_results"
    kwargs: dict = {}
    if case == "mismatched_checkpoint":
        other = network_from_plans(tiny_plans(features=(4, 8, 32)), "3d_fullres", 1, 3).state_dict()
        results, match = write_results(root, weights=other), "does not match the network built from plans.json"
    elif case == "classes_differ":
        other = network_from_plans(tiny_plans(), "3d_fullres", 1, 5).state_dict()
        results, match = write_results(root, weights=other), "predicts 5 classes .* dataset.json lists 3"
    elif case == "region_labels":
        ds = dataset_json()
        ds["labels"] = {"background": 0, "organ": [1, 2]}
        results, match = write_results(root, ds=ds), "region-based"
    else:
        results = write_results(root)
        if case == "no_plans":
            (results / "plans.json").unlink()
            match = "no plans.json in"
        elif case == "wrong_fold":
            kwargs, match = {"fold": 3}, r"no fold 3 .*found: fold_0"
        elif case == "missing_checkpoint":
            kwargs, match = {"checkpoint": "checkpoint_best.pth"}, r"checkpoint not found.*found: checkpoint_final.pth"
        elif case == "not_a_checkpoint":
            (results / "fold_0" / "checkpoint_final.pth").write_bytes(b"not a torch file")
            match = "corrupt or not a torch file"
        else:  # wrong_configuration
            plans = tiny_plans()
            plans["configurations"]["3d_lowres"] = copy.deepcopy(plans["configurations"]["3d_fullres"])
            (results / "plans.json").write_text(json.dumps(plans))
            kwargs, match = {"configuration": "3d_lowres"}, "trained with configuration '3d_fullres'"
    dest = tmp_path / "dest" / "bundle"
    dest.parent.mkdir()
    with pytest.raises(ModelFileError, match=match):
        import_nnunet(results, dest, **kwargs)
    _no_leftovers(dest.parent, dest)


def test_import_refuses_existing_destination_unless_overwrite(tmp_path):
    results = write_results(tmp_path / "r")
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")
    with pytest.raises(BundleExistsError, match="not empty"):
        import_nnunet(results, dest)
    assert sorted(p.name for p in dest.iterdir()) == ["keep.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    import_nnunet(results, dest, overwrite=True)
    assert not (dest / "keep.txt").exists() and (dest / "models" / "model.pt").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_residual_encoder_unet_plans_build_too():
    plans = tiny_plans()
    arch = plans["configurations"]["3d_fullres"]["architecture"]
    arch["network_class_name"] = "ResidualEncoderUNet"
    arch["arch_kwargs"]["n_blocks_per_stage"] = arch["arch_kwargs"].pop("n_conv_per_stage")
    net = network_from_plans(plans, "3d_fullres", 1, 3)
    assert type(net).__name__ == "ResidualEncoderUNet"
    with torch.no_grad():
        assert tuple(net.eval()(torch.zeros(1, 1, 16, 8, 16)).shape) == (1, 3, 16, 8, 16)
