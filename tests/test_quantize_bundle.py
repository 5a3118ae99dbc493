"""``medptq quantize`` on bundles in the model zoo's layout (tests/zoo_bundles), then the INT8 overlay run
through ``python -m monai.bundle run`` on the real CT (and four MRI-like channels made from it)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medptq_monai.bundle.bundle_config import importable_scripts, read_bundle
from medptq_monai.bundle.overlay import OVERLAY_NAME, SourceCheckedEngineNetwork, state_digest
from medptq_monai.bundle.quantize_bundle import quantize_bundle
from medptq_monai.errors import BundleConfigError, CalibrationError, MedPTQError, ModelFileError
from medptq_monai.metrics import dice_per_class

from conftest import DATA

ZOO = Path(__file__).resolve().parent / "zoo_bundles"
CT_SMALL = DATA / "images_small"
CT_FULL = DATA / "images"
FAST = {"num_patches": 6, "heldout_patches": 2, "progress": False}


# ---------------------------------------------------------------- helpers


def _copy(name: str, dest: Path) -> Path:
    return Path(shutil.copytree(ZOO / name, dest / name, ignore=shutil.ignore_patterns("__pycache__")))


def _network(bundle: Path) -> torch.nn.Module:
    config = read_bundle(bundle)
    with importable_scripts(config.root):
        return config.parsed("network_def", "test")


def _save_weights(bundle: Path, seed: int = 0, network: torch.nn.Module | None = None) -> Path:
    """Seeded random weights (or ``network``'s) as the bundle's models/model.pt."""
    if network is None:
        torch.manual_seed(seed)
        network = _network(bundle)
    path = bundle / "models" / "model.pt"
    path.parent.mkdir(exist_ok=True)
    torch.save(network.state_dict(), path)
    return path


def _train_liver(bundle: Path, steps: int = 40, roi: int = 32) -> None:
    """A few seconds of seeded training of the bundle's network on liver in the full example CT."""
    from monai.losses import DiceCELoss
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, Orientationd, ScaleIntensityRanged, Spacingd

    config = read_bundle(bundle)
    pixdim = config.parser.get("preprocessing#transforms#3#pixdim")
    window = config.parser.get("preprocessing#transforms#4")
    keys = ["image", "label"]
    load = Compose([LoadImaged(keys), EnsureChannelFirstd(keys), Orientationd(keys, "RAS"),
                    Spacingd(keys, pixdim, mode=("bilinear", "nearest")),
                    ScaleIntensityRanged("image", window["a_min"], window["a_max"], 0.0, 1.0, clip=True)])
    item = load({"image": str(CT_FULL / "abdomen_ct.nii.gz"),
                 "label": str(DATA / "labels" / "abdomen_ct.nii.gz")})
    image = np.asarray(item["image"], np.float32)
    label = (np.asarray(item["label"]) == 5).astype(np.int64)  # TotalSegmentator class 5: liver
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    network = _network(bundle).train()
    optimizer = torch.optim.Adam(network.parameters(), 1e-2)
    loss = DiceCELoss(to_onehot_y=True, softmax=True)
    liver = np.argwhere(label[0] > 0)
    for _ in range(steps):
        xs, ys = [], []
        for b in range(4):
            if b % 2 == 0:
                centre = liver[rng.integers(len(liver))]
                start = [int(np.clip(c - roi // 2, 0, n - roi)) for c, n in zip(centre, image.shape[1:])]
            else:
                start = [int(rng.integers(0, n - roi + 1)) for n in image.shape[1:]]
            window_slices = (slice(None), *(slice(s, s + roi) for s in start))
            xs.append(image[window_slices])
            ys.append(label[window_slices])
        optimizer.zero_grad()
        loss(network(torch.from_numpy(np.stack(xs))), torch.from_numpy(np.stack(ys))).backward()
        optimizer.step()
    _save_weights(bundle, network=network.eval())


def _bundle_run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """``python -m monai.bundle run ARGS`` in a fresh interpreter (outside the repository, so only the
    bundle's own ``scripts`` package is importable)."""
    return subprocess.run([sys.executable, "-m", "monai.bundle", "run", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _run_in_process(bundle: Path, configs: list[str], **overrides) -> None:
    from monai.bundle import run

    run(config_file=[str(bundle / "configs" / c) for c in configs], bundle_root=str(bundle), **overrides)


def _only_output(folder: Path) -> nib.Nifti1Image:
    files = sorted(folder.rglob("*.nii.gz"))
    assert len(files) == 1, files
    return nib.load(str(files[0]))


def _assert_same_grid(out: nib.Nifti1Image, source: Path) -> None:
    ref = nib.load(str(source))
    assert out.shape[:3] == ref.shape[:3], (out.shape, ref.shape)
    np.testing.assert_allclose(out.affine, ref.affine, atol=1e-4)


def _cause(err: BaseException | None, kind: type) -> BaseException | None:
    while err is not None and not isinstance(err, kind):
        err = err.__cause__ or err.__context__
    return err


def _files(root: Path) -> dict[str, tuple[int, int]]:
    """Every file (and folder name) under ``root`` with size and mtime: what "writes nothing" compares."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else (-1, -1)
            for p in root.rglob("*")}


def _mri_case(dest: Path) -> Path:
    """Four co-registered MRI-like channels made from the small real CT (different intensity mappings of the
    same slab, zero outside the body as in skull-stripped MRI) under ``dest/case_000``."""
    ct = nib.load(str(CT_SMALL / "abdomen_ct_small.nii.gz"))
    hu = np.asarray(ct.dataobj, np.float32)
    body = hu > -500
    t1 = np.clip((hu + 200.0) / 500.0, 0, 1)
    t1ce = t1 + 0.8 * (hu > 150)
    t2 = 1.0 - np.clip((hu + 100.0) / 200.0, 0, 1)
    flair = (t2 + np.roll(t2, 1, 0) + np.roll(t2, -1, 0) + np.roll(t2, 1, 1) + np.roll(t2, -1, 1)) / 5.0
    case = dest / "case_000"
    case.mkdir(parents=True)
    for name, arr in (("t1", t1), ("t1ce", t1ce), ("t2", t2), ("flair", flair)):
        volume = nib.Nifti1Image((arr * body * 1000.0).astype(np.float32), ct.affine)
        nib.save(volume, str(case / f"case_000_{name}.nii.gz"))
    return case


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def trained_ct(tmp_path_factory) -> tuple[Path, dict]:
    """The 2-class PReLU U-Net bundle, trained a few seconds on liver, quantized on the small CT."""
    bundle = _copy("ct_unet_prelu", tmp_path_factory.mktemp("ct"))
    _train_liver(bundle)
    summary = quantize_bundle(bundle, dataset_dir=str(CT_SMALL), num_patches=8, heldout_patches=2, progress=False)
    return bundle, summary


@pytest.fixture(scope="module")
def mri_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mri")
    _mri_case(root)
    return root


@pytest.fixture(scope="module")
def mri_bundle(tmp_path_factory, mri_dir) -> tuple[Path, dict]:
    """The 4-channel sigmoid SegResNet bundle (seeded weights), quantized through its decathlon datalist."""
    bundle = _copy("mri_segresnet_sigmoid", tmp_path_factory.mktemp("mri_bundle"))
    _save_weights(bundle)
    summary = quantize_bundle(bundle, dataset_dir=str(mri_dir), calibrator="max", **FAST)
    return bundle, summary


@pytest.fixture(scope="module")
def quantized_small_ct(tmp_path_factory) -> Path:
    """The U-Net bundle with seeded weights, quantized once: the base of the bad-input cases."""
    bundle = _copy("ct_unet_prelu", tmp_path_factory.mktemp("base"))
    _save_weights(bundle)
    quantize_bundle(bundle, dataset_dir=str(CT_SMALL), calibrator="max", **FAST)
    return bundle


# ---------------------------------------------------------------- the three zoo-style bundles


def test_trained_ct_unet_int8_overlay_agrees_with_fp32(trained_ct, tmp_path):
    bundle, summary = trained_ct
    models = bundle / "models"
    assert summary["fp32_onnx"] == "models/model.onnx" and summary["int8_onnx"] == "models/model_int8.onnx"
    assert summary["overlay"] == f"configs/{OVERLAY_NAME}" and (bundle / "configs" / OVERLAY_NAME).is_file()
    assert summary["fp32_bytes"] == (models / "model.onnx").stat().st_size
    assert summary["size_ratio"] > 3.0 and summary["float_layers"] == []
    assert summary["heldout_patches"] == 2 and summary["sqnr_db"] > 20.0
    assert summary["seconds"] > 0 and summary["peak_rss_bytes"] > 0 and summary["bundle"] == str(bundle)
    assert not list(models.glob(".quantizing-*"))

    # bundle_root "." as in the zoo: run from inside the bundle, as MONAI's docs do
    out_int8, out_fp32 = tmp_path / "int8", tmp_path / "fp32"
    proc = _bundle_run(["--config_file", "['configs/inference.json','configs/inference_int8.json']",
                        "--dataset_dir", str(CT_FULL), "--output_dir", str(out_int8)], cwd=bundle)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _run_in_process(bundle, ["inference.json"], dataset_dir=str(CT_FULL), output_dir=str(out_fp32))

    source = CT_FULL / "abdomen_ct.nii.gz"
    int8, fp32 = _only_output(out_int8), _only_output(out_fp32)
    _assert_same_grid(int8, source)
    _assert_same_grid(fp32, source)
    a, b = np.asarray(fp32.dataobj), np.asarray(int8.dataobj)
    assert a.sum() > 1000, "the briefly trained network segments some liver"
    assert (a != b).any(), "the overlay run is the INT8 engine, not the FP32 weights again"
    dice = dice_per_class(b, a, 2)[1]
    print(f"Dice INT8 vs FP32 (liver, full CT): {dice:.4f}; SQNR {summary['sqnr_db']} dB; "
          f"size {summary['fp32_bytes']} -> {summary['int8_bytes']} ({summary['size_ratio']}x)")
    assert dice >= 0.98


def test_four_channel_sigmoid_segresnet_with_decathlon_datalist(mri_bundle, mri_dir, tmp_path):
    bundle, summary = mri_bundle
    assert summary["in_channels"] == 4 and summary["num_classes"] == 3 and summary["roi_size"] == [48, 48, 32]
    out_int8, out_fp32 = tmp_path / "int8", tmp_path / "fp32"
    configs = f"['{bundle}/configs/inference.json','{bundle}/configs/inference_int8.json']"
    proc = _bundle_run(["--config_file", configs, "--bundle_root", str(bundle), "--dataset_dir", str(mri_dir),
                        "--output_dir", str(out_int8)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _run_in_process(bundle, ["inference.json"], dataset_dir=str(mri_dir), output_dir=str(out_fp32))
    channel = mri_dir / "case_000" / "case_000_t1.nii.gz"
    int8, fp32 = _only_output(out_int8), _only_output(out_fp32)
    _assert_same_grid(int8, channel)
    a, b = np.asarray(fp32.dataobj).squeeze(), np.asarray(int8.dataobj).squeeze()
    assert a.shape == nib.load(str(channel)).shape
    assert set(np.unique(b).tolist()) <= {0, 1, 2, 4}
    print(f"four-channel SegResNet (random init): voxel agreement INT8 vs FP32 {np.mean(a == b):.4f}, "
          f"SQNR {summary['sqnr_db']} dB")


def test_network_from_bundle_scripts_with_105_classes_via_cli(tmp_path, capsys):
    from medptq_monai.cli import main

    bundle = _copy("ct_scripts_net_105", tmp_path)
    _save_weights(bundle, seed=1)
    raw = json.loads((bundle / "configs" / "inference.json").read_text())
    assert raw["bundle_root"].startswith("/models/"), "an absolute bundle_root of another machine, as in the zoo"
    code = main(["quantize", str(bundle), "--config_file", "['configs/inference.json']", "--dataset_dir",
                 str(CT_SMALL), "--calibrator", "max", "--num_patches", "4", "--heldout_patches", "1",
                 "--exclude", "/head*", "--progress", "False"])
    printed = capsys.readouterr().out
    assert code == 0 and "sqnr_db" in printed and "model_int8.onnx" in printed
    assert sys.modules["scripts"].__path__[0] == str(bundle / "scripts"), "the bundle's own scripts package"
    float_line = next(line for line in printed.splitlines() if line.startswith("float_layers:"))
    assert "/head/Conv" in float_line, "--exclude keeps the 105-class head in float"

    out = tmp_path / "out"
    configs = f"['{bundle}/configs/inference.json','{bundle}/configs/inference_int8.json']"
    proc = _bundle_run(["--config_file", configs, "--bundle_root", str(bundle), "--dataset_dir", str(CT_SMALL),
                        "--output_dir", str(out)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seg = _only_output(out)
    _assert_same_grid(seg, CT_SMALL / "abdomen_ct_small.nii.gz")
    assert int(np.asarray(seg.dataobj).max()) < 105

    # --precision fp32 runs models/model.onnx, --engine picks the runtime; both through the same overlay
    for overrides, sub in (({"precision": "fp32"}, "fp32"), ({"engine": "onnxruntime"}, "ort")):
        _run_in_process(bundle, ["inference.json", OVERLAY_NAME], dataset_dir=str(CT_SMALL),
                        output_dir=str(tmp_path / sub), **overrides)
        assert _only_output(tmp_path / sub).shape[:3] == seg.shape[:3]


# ---------------------------------------------------------------- the bundle's own checkpoint loading


def test_checkpoint_loaders_keep_the_int8_engine_and_catch_a_changed_checkpoint(quantized_small_ct, tmp_path):
    bundle = Path(shutil.copytree(quantized_small_ct, tmp_path / "b"))
    # checkpointloader in initialize behind load_pretrain: off, and on (it checks and keeps the engine)
    for load in (False, True):
        _run_in_process(bundle, ["inference.json", OVERLAY_NAME], dataset_dir=str(CT_SMALL),
                        output_dir=str(tmp_path / f"out{load}"), load_pretrain=load)
        _assert_same_grid(_only_output(tmp_path / f"out{load}"), CT_SMALL / "abdomen_ct_small.nii.gz")
    # models/model.pt retrained after quantizing: the loader must not silently run a stale INT8 model
    _save_weights(bundle, seed=7)
    with pytest.raises(Exception) as info:
        _run_in_process(bundle, ["inference.json", OVERLAY_NAME], dataset_dir=str(CT_SMALL),
                        output_dir=str(tmp_path / "stale"))
    cause = _cause(info.value, ModelFileError)
    assert cause is not None and "re-run `medptq quantize`" in str(cause), repr(info.value)


def test_source_checked_network_accepts_only_its_source_state(quantized_small_ct):
    model = quantized_small_ct / "models" / "model_int8.onnx"
    state = torch.load(str(quantized_small_ct / "models" / "model.pt"), weights_only=True)
    net = SourceCheckedEngineNetwork(model, source_digest=state_digest(state), engine="onnxruntime",
                                     in_channels=1, num_classes=2, roi_size=[32, 32, 32])
    x = torch.rand(1, 1, 32, 32, 32)
    before = net(x)
    assert net.load_state_dict({"model": state}, strict=True) == ([], [])
    torch.testing.assert_close(net(x), before)
    changed = {k: v + 1 if v.is_floating_point() else v for k, v in state.items()}
    with pytest.raises(ModelFileError, match="not the one"):
        net.load_state_dict(changed)
    with pytest.raises(BundleConfigError, match="torch"):
        SourceCheckedEngineNetwork(model, source_digest=None, engine="torch")
    with pytest.raises(ModelFileError, match="medptq quantize"):
        SourceCheckedEngineNetwork(model.with_name("missing.onnx"))


# ---------------------------------------------------------------- bad input: a specific error, nothing written


def _edit_config(bundle: Path, edit) -> None:
    path = bundle / "configs" / "inference.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config, indent=4))


def _edit_meta(bundle: Path, edit) -> None:
    path = bundle / "configs" / "metadata.json"
    meta = json.loads(path.read_text())
    edit(meta["network_data_format"])
    path.write_text(json.dumps(meta, indent=4))


def _other_checkpoint(bundle: Path) -> dict:
    from monai.networks.nets import UNet

    torch.save(UNet(3, 1, 2, (8, 16), (2,), num_res_units=1).state_dict(), bundle / "other.pt")
    return {"checkpoint": str(bundle / "other.pt")}


def _empty_dataset(bundle: Path) -> dict:
    (bundle.parent / "empty").mkdir()
    return {"dataset_dir": str(bundle.parent / "empty")}


BAD = {
    "no network_def": (lambda b: _edit_config(b, lambda c: c.pop("network_def")), BundleConfigError,
                       "`network_def`"),
    "no inferer": (lambda b: _edit_config(b, lambda c: c.pop("inferer")), BundleConfigError, "`inferer`"),
    "inferer without roi": (
        lambda b: _edit_config(b, lambda c: c.__setitem__("inferer", {"_target_": "SimpleInferer"})),
        BundleConfigError, "no roi_size"),
    "checkpoint missing": (lambda b: (b / "models" / "model.pt").unlink(), ModelFileError, "models/model.pt"),
    "checkpoint of another network": (_other_checkpoint, ModelFileError, "does not match `network_def`"),
    "empty datalist": (_empty_dataset, CalibrationError, "`dataset` is empty"),
    "metadata input channels": (lambda b: _edit_meta(b, lambda m: m["inputs"]["image"].__setitem__("num_channels", 2)),
                                ModelFileError, "metadata.json inputs.image.num_channels"),
    "metadata output channels": (lambda b: _edit_meta(b, lambda m: m["outputs"]["pred"].__setitem__("num_channels", 3)),
                                 ModelFileError, "outputs 2 classes but the bundle metadata says 3"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_bundle_stops_with_a_specific_error_and_writes_nothing(quantized_small_ct, tmp_path, case):
    bundle = Path(shutil.copytree(quantized_small_ct, tmp_path / "b"))
    prepare, kind, match = BAD[case]
    extra = prepare(bundle) or {}
    settings = {"dataset_dir": str(CT_SMALL), "calibrator": "max", **FAST, **extra}
    before = _files(bundle)
    with pytest.raises(kind) as info:
        quantize_bundle(bundle, **settings)
    assert match in str(info.value), str(info.value)
    assert _files(bundle) == before, "a failed quantize must leave the bundle (and its previous INT8 pair) as it was"


def test_data_with_other_channels_than_the_network_is_refused(mri_bundle, mri_dir, tmp_path):
    bundle = Path(shutil.copytree(mri_bundle[0], tmp_path / "b"))
    three = {"testing": [{"image": [f"case_000/case_000_{m}.nii.gz" for m in ("t1", "t1ce", "t2")]}]}
    datalist = tmp_path / "three.json"
    datalist.write_text(json.dumps(three))
    before = _files(bundle)
    with pytest.raises(CalibrationError, match=r"has 3 channel\(s\) after `preprocessing`, but the network takes 4"):
        quantize_bundle(bundle, dataset_dir=str(mri_dir), data_list_file_path=str(datalist), **FAST)
    assert _files(bundle) == before


def test_cli_reports_bad_input_in_one_line(quantized_small_ct, tmp_path, capsys):
    from medptq_monai.cli import main

    bundle = Path(shutil.copytree(quantized_small_ct, tmp_path / "b"))
    _edit_config(bundle, lambda c: c.pop("network_def"))
    assert main(["quantize", str(bundle), "--dataset_dir", str(CT_SMALL)]) == 2
    err = capsys.readouterr().err
    assert "medptq: error:" in err and "`network_def`" in err and "Traceback" not in err


def test_missing_bundle_parts_are_named(tmp_path):
    with pytest.raises(BundleConfigError, match="bundle folder not found"):
        quantize_bundle(tmp_path / "nope")
    bundle = _copy("ct_unet_prelu", tmp_path)
    (bundle / "configs" / "metadata.json").unlink()
    with pytest.raises(BundleConfigError, match="metadata.json"):
        quantize_bundle(bundle)
    with pytest.raises(BundleConfigError, match="config file not found"):
        quantize_bundle(bundle, config_file=["configs/inference.json", "configs/missing.json"])
    assert isinstance(BundleConfigError("x"), MedPTQError)


def test_yaml_config_and_a_datalist_override(quantized_small_ct, tmp_path):
    import yaml

    bundle = Path(shutil.copytree(quantized_small_ct, tmp_path / "b"))
    config = bundle / "configs" / "inference.json"
    (bundle / "configs" / "inference.yaml").write_text(yaml.safe_dump(json.loads(config.read_text())))
    config.unlink()
    image = str(CT_SMALL / "abdomen_ct_small.nii.gz")
    summary = quantize_bundle(bundle, datalist=[image], calibrator="max", **FAST)
    assert summary["config_files"] == ["configs/inference.yaml"] and summary["num_patches"] == FAST["num_patches"]
    _run_in_process(bundle, ["inference.yaml", OVERLAY_NAME], datalist=[image], output_dir=str(tmp_path / "o"))
    _assert_same_grid(_only_output(tmp_path / "o"), CT_SMALL / "abdomen_ct_small.nii.gz")
