"""Peak memory of streaming calibration on a large model: MONAI SwinUNETR (feature 48, 96³, 14 classes).

Random weights (memory does not depend on them), real CT patches. Exports the FP32 ONNX, then
calibrates + quantizes in a child process whose peak RSS is sampled. Writes
reports/calibration_memory.json. Usage: python scripts/calibration_memory.py [--patches 4] [--calibrator max]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from medptq_monai.export.torch_export import export_fp32
from medptq_monai.fileio import write_text_atomic
from medptq_monai.machine import PeakRSS, machine_info

CHILD = r"""
import sys, nibabel as nib, numpy as np
from medptq_monai.calibrate.patches import PatchPlan, sample_patches
from medptq_monai.calibrate.quantize import QuantizeOptions, quantize_onnx
arr = np.asarray(nib.load(sys.argv[3]).dataobj, dtype=np.float32)
vol = np.clip((arr + 175.0) / 425.0, 0.0, 1.0)[None]
patches = sample_patches([vol], PatchPlan(roi_size=(96, 96, 96), num_patches=int(sys.argv[4])))
quantize_onnx(sys.argv[1], sys.argv[2], patches, QuantizeOptions(calibrator=sys.argv[5]))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patches", type=int, default=4)
    ap.add_argument("--calibrator", default="max")
    ap.add_argument("--ct", default="tests/data/totalseg_ct/images/abdomen_ct.nii.gz")
    ap.add_argument("--out", default="reports/calibration_memory.json")
    args = ap.parse_args()
    from monai.networks.nets import SwinUNETR

    torch.manual_seed(0)
    net = SwinUNETR(in_channels=1, out_channels=14, feature_size=48, spatial_dims=3)
    with tempfile.TemporaryDirectory() as tmp:
        fp32, int8 = Path(tmp) / "swin_fp32.onnx", Path(tmp) / "swin_int8.onnx"
        export_fp32(net, fp32, 1, (96, 96, 96))
        cmd = [sys.executable, "-c", CHILD, str(fp32), str(int8), args.ct, str(args.patches), args.calibrator]
        start = time.perf_counter()
        proc = subprocess.Popen(cmd)
        with PeakRSS(proc.pid) as mem:
            code = proc.wait()
        if code:
            raise SystemExit(f"calibration failed with exit code {code}")
        result = {
            "model": "MONAI SwinUNETR feature_size 48, roi 96^3, 14 classes (random weights)",
            "params": sum(p.numel() for p in net.parameters()),
            "calibrator": args.calibrator,
            "patches": args.patches,
            "calib_peak_bytes": mem.peak,
            "seconds": time.perf_counter() - start,
            "onnx_fp32_bytes": fp32.stat().st_size,
            "onnx_int8_bytes": int8.stat().st_size,
            "machine": machine_info(),
        }
    write_text_atomic(args.out, json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=2))


if __name__ == "__main__":
    main()
