"""Compare the calibrators on one bundle: INT8 vs FP32 fidelity on real CT.

For each calibrator: calibrate on the calibration folder, segment the evaluation images with
the INT8 engine, and score Dice against the FP32 (torch) segmentation and the labels.
Writes reports/calibrators.json and reports/calibrators.md. Usage:

    python scripts/compare_calibrators.py [--bundle bundles/unet_int8] [--data tests/data/totalseg_ct]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np

from medptq_monai.bundle import quantize_bundle
from medptq_monai.bundle.overlay import OVERLAY_NAME
from medptq_monai.bundle.runner import bundle_parser, run_inference
from medptq_monai.bundle.transforms import load_remapped_label
from medptq_monai.calibrate.calibrators import CALIBRATORS
from medptq_monai.fileio import relative_paths, write_text_atomic
from medptq_monai.machine import machine_info
from medptq_monai.metrics import dice_per_class, mean_dice


def _segs(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(nib.load(str(p)).dataobj) for p in sorted(folder.glob("*_seg.nii.gz"))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", default="bundles/unet_int8")
    ap.add_argument("--data", default="tests/data/totalseg_ct")
    ap.add_argument("--out", default="reports")
    ap.add_argument("--calib_dir", default=None, help="calibration images (default: <data>/calibration)")
    ap.add_argument("--calibrators", default=",".join(CALIBRATORS))
    ap.add_argument("--exclude", default=None,
                    help="comma-separated node-name patterns kept in float ('' for none; default: the bundle's)")
    args = ap.parse_args()
    data, out = Path(args.data).resolve(), Path(args.out)
    calib_dir = Path(args.calib_dir).resolve() if args.calib_dir else data / "calibration"
    exclude = None if args.exclude is None else [p for p in args.exclude.split(",") if p]
    with tempfile.TemporaryDirectory() as tmp:
        bundle = Path(tmp) / "bundle"
        shutil.copytree(args.bundle, bundle, ignore=shutil.ignore_patterns("*.onnx", ".cache", "eval"))
        parser = bundle_parser(bundle, ["inference.json"])
        label_map, k = parser.get_parsed_content("label_map"), int(parser.get_parsed_content("num_classes"))
        run_inference(bundle, dataset_dir=str(data / "images"), output_dir=f"{tmp}/fp32")  # inference.json: FP32
        fp32 = _segs(Path(tmp) / "fp32")
        labels = {f"{p.name[:-7]}_seg.nii.gz": load_remapped_label(p, label_map) for p in (data / "labels").glob("*.nii.gz")}
        rows = []
        for name in args.calibrators.split(","):
            summary = quantize_bundle(bundle, calibrator=name, exclude=exclude, progress=False,
                                      dataset_dir=str(calib_dir))
            run_inference(bundle, ["inference.json", OVERLAY_NAME], dataset_dir=str(data / "images"),
                          output_dir=f"{tmp}/{name}", engine="openvino")
            int8 = _segs(Path(tmp) / name)
            rows.append({
                "calibrator": name,
                "dice_int8_vs_fp32": float(np.mean([mean_dice(dice_per_class(int8[c], fp32[c], k)) for c in fp32])),
                "dice_int8": float(np.mean([mean_dice(dice_per_class(int8[c], labels[c], k)) for c in fp32])),
                "dice_fp32": float(np.mean([mean_dice(dice_per_class(fp32[c], labels[c], k)) for c in fp32])),
            })
            print(rows[-1], flush=True)
    report = relative_paths({"rows": rows, "machine": machine_info(), "bundle": args.bundle, "data": str(data),
                             "calibration_data": str(calib_dir), "exclude": summary["float_layers"], "command": " ".join(sys.argv)})
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "calibrators.json", json.dumps(report, indent=2) + "\n")
    md = [f"Float layers: {exclude or 'none'}; calibration data: {calib_dir.name}/; command: `{report['command']}`", "",
          "| calibrator | Dice INT8 vs FP32 | Dice INT8 vs labels | Dice FP32 vs labels |", "|---|---:|---:|---:|"]
    md += [f"| {r['calibrator']} | {r['dice_int8_vs_fp32']:.4f} | {r['dice_int8']:.4f} | {r['dice_fp32']:.4f} |"
           for r in rows]
    write_text_atomic(out / "calibrators.md", "\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
