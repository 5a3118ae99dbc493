"""Shared fixtures: real CT data, a small real network exported/quantized once, a bundle copy."""

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
from monai.networks.nets import UNet

from medptq_monai.calibrate.patches import PatchPlan, sample_patches
from medptq_monai.calibrate.quantize import QuantizeOptions, quantize_onnx
from medptq_monai.engines.cpu_isa import accumulates_in_32_bits, engine_isa
from medptq_monai.engines.tensorrt_engine import tensorrt_available
from medptq_monai.export.torch_export import export_fp32

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data" / "totalseg_ct"
BUNDLE = ROOT / "bundles" / "unet_int8"
SMALL_ROI = (32, 32, 32)

# The engines' own test (package >= 10 + CUDA GPU): tests that expect TensorRT to be absent are skipped where
# it is usable, and tests of engine ``auto`` expect ``tensorrt`` there.
TENSORRT_USABLE, TENSORRT_REASON = tensorrt_available()
needs_no_tensorrt = pytest.mark.skipif(
    TENSORRT_USABLE, reason="TensorRT is usable here: this checks the behaviour without it"
)


# On a CPU that sums INT8 products in 32 bits (VNNI/AMX), OpenVINO's AVX2 path (16-bit pair sums, 7-bit
# weights) is shown by ONEDNN_MAX_CPU_ISA=AVX2 in a subprocess; on a CPU without, the host path already is it.
OPENVINO_ISA = engine_isa("openvino")
needs_avx2_simulation = pytest.mark.skipif(
    not accumulates_in_32_bits(OPENVINO_ISA),
    reason=f"OpenVINO's INT8 path here is already {OPENVINO_ISA} (16-bit sums): the host-ISA tests cover it",
)


def int8_run_on_avx2(bundle: Path, configs: list[str], dataset_dir: Path, output_dir: Path, *args: str) -> str:
    """``python -m monai.bundle run`` of the bundle's ``configs`` with OpenVINO INT8 capped to AVX2; returns its log."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    files = json.dumps([str(bundle / "configs" / c) for c in configs])
    proc = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "--config_file", files, "--bundle_root", str(bundle),
         "--dataset_dir", str(dataset_dir), "--output_dir", str(output_dir), "--engine", "openvino",
         "--precision", "int8", *args],
        cwd=output_dir.parent, env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def auto_engine(cpu_engine: str = "openvino") -> str:
    """The engine that ``auto`` resolves to on this machine: TensorRT when usable, else ``cpu_engine``."""
    return "tensorrt" if TENSORRT_USABLE else cpu_engine


def small_unet() -> torch.nn.Module:
    """A small MONAI UNet with the bundle's block types (Conv/ConvTranspose, BatchNorm, ReLU)."""
    torch.manual_seed(0)
    net = UNet(3, 1, 3, (8, 16, 32), (2, 2), num_res_units=1, norm="batch", act="relu")
    # non-trivial BatchNorm statistics so folding is exercised
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm3d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return net.eval()


def ct_volume() -> np.ndarray:
    """The small real CT, HU-windowed to [0, 1], as [1, D, H, W] float32."""
    arr = np.asarray(nib.load(str(DATA / "images_small" / "abdomen_ct_small.nii.gz")).dataobj, dtype=np.float32)
    return np.clip((arr + 175.0) / 425.0, 0.0, 1.0)[None]


def ct_patches(n: int, seed: int = 0, roi=SMALL_ROI) -> list[np.ndarray]:
    return list(sample_patches([ct_volume()], PatchPlan(roi_size=roi, num_patches=n, seed=seed)))


@pytest.fixture(scope="session")
def small_fp32(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("small") / "small_fp32.onnx"
    export_fp32(small_unet(), path, 1, SMALL_ROI)
    return path


@pytest.fixture(scope="session")
def small_int8(small_fp32) -> Path:
    out = small_fp32.with_name("small_int8.onnx")
    quantize_onnx(small_fp32, out, ct_patches(6), QuantizeOptions(calibrator="max"))
    return out


def copy_bundle(dest: Path, src: Path = BUNDLE) -> Path:
    """Copy a bundle (configs, docs, shipped checkpoints; no generated models) to ``dest``."""
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("*.onnx", "eval", ".cache", "*.plan"))
    return dest


@pytest.fixture(scope="session")
def calibrated_bundle(tmp_path_factory) -> Path:
    """The real bundle with its shipped demo checkpoint, quantized (``medptq quantize``) on the small real CT
    (8 patches)."""
    from medptq_monai.bundle import quantize_bundle

    bundle = copy_bundle(tmp_path_factory.mktemp("bundle") / "unet_int8")
    quantize_bundle(bundle, num_patches=8, heldout_patches=0, progress=False, dataset_dir=str(DATA / "images_small"))
    return bundle
