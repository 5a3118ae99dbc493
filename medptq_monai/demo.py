"""The main job: calibrate the U-Net bundle, segment the real CT in FP32 and INT8, report.

``bash scripts/demo.sh`` → ``medptq demo``. Writes segmentation NIfTIs under
``reports/demo_out/{fp32,int8}`` and ``reports/demo.json`` + ``reports/demo.md``.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

from .machine import machine_info
from .metrics import dice_per_class, mean_dice
from .bundle.runner import bundle_parser, run_inference
from .bundle.transforms import label_path, load_remapped_label
from .errors import MedPTQError
from .fileio import write_text_atomic


def _seg(out_dir: Path, image: Path) -> np.ndarray:
    return np.asarray(nib.load(str(label_path(out_dir, image))).dataobj)


def _markdown(report: dict) -> str:
    rows = [
        ("model", report["model"]),
        ("calibration", f"{report['calibrator']}, {report['calibration_patches']} patches from "
         f"{Path(report['calibration_data']).name}/"),
        ("engine (INT8)", report["engine"]),
        ("machine", report["machine"]["summary"]),
        ("ONNX FP32 / INT8 bytes", f"{report['onnx_fp32_bytes']:,} / {report['onnx_int8_bytes']:,} "
         f"({report['size_ratio']:.2f}x smaller)"),
        ("Dice vs labels, FP32 (torch)", f"{report['dice_fp32']:.4f}"),
        ("Dice vs labels, INT8", f"{report['dice_int8']:.4f}"),
        ("Dice INT8 vs FP32", f"{report['dice_int8_vs_fp32']:.4f}"),
        ("whole volume s, torch FP32 sliding window", f"{report['volume_seconds_torch_fp32']:.2f}"),
        ("whole volume s, INT8", f"{report['volume_seconds_int8']:.2f}"),
        ("one-time warm-up s (FP32 / INT8, not in the times above)",
         f"{report['warmup_seconds_torch_fp32']:.2f} / {report['warmup_seconds_int8']:.2f}"),
        ("speedup (whole volume)", f"{report['volume_speedup']:.2f}x"),
    ]
    lines = ["# medptq-monai demo", "", f"Command: `{report['command']}`, {report['date']}", "",
             "| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows], "",
             "Per organ Dice (source grid, organs present in the labels):", "",
             "| organ | FP32 | INT8 |", "|---|---|---|"]
    for organ, (f32, i8) in report["per_organ_dice"].items():
        lines.append(f"| {organ} | {f32:.4f} | {i8:.4f} |")
    lines += ["", "Demo model: trained briefly on this one CT (pseudo labels from TotalSegmentator); the Dice "
              "values show INT8 fidelity, not clinical accuracy.", ""]
    return "\n".join(lines)


def run_demo(
    bundle: str = "bundles/unet_int8",
    data_dir: str = "tests/data/totalseg_ct",
    out_dir: str = "reports",
    engine: str = "auto",
) -> dict:
    """Calibrate → FP32 torch and INT8 whole-volume inference on the real CT → Dice, time, size report.

    Calibration uses ``<data_dir>/calibration`` when it exists (a different patient from the
    evaluated ``<data_dir>/images``), else the evaluated images themselves.
    """
    bundle_path, data, out = Path(bundle).resolve(), Path(data_dir).resolve(), Path(out_dir).resolve()
    images, labels = data / "images", data / "labels"
    calib_dir = data / "calibration" if (data / "calibration").is_dir() else images
    checkpoint = bundle_path / "models" / "model.pt"
    if not checkpoint.is_file():
        raise MedPTQError(f"demo checkpoint missing: {checkpoint} (it ships with the repository)")
    if not images.is_dir() or not labels.is_dir():
        raise MedPTQError(f"demo data needs {images} and {labels}")

    print(f"[1/4] calibrating {bundle_path.name} on {calib_dir}", flush=True)
    calib = bundle_parser(bundle_path, ["inference.json", "calibrate.json"], dataset_dir=str(calib_dir))
    summary = calib.get_parsed_content("calibration").run()

    print("[2/4] FP32 whole-volume inference (MONAI sliding window, torch eager)", flush=True)
    fp32_dir = out / "demo_out" / "fp32"
    fp32 = run_inference(bundle_path, dataset_dir=str(images), output_dir=str(fp32_dir), warmup=True,
                         engine="torch", precision="fp32")
    print(f"[3/4] INT8 whole-volume inference (engine={engine})", flush=True)
    int8_dir = out / "demo_out" / "int8"
    int8 = run_inference(bundle_path, dataset_dir=str(images), output_dir=str(int8_dir), warmup=True,
                         engine=engine, precision="int8")

    print("[4/4] Dice and report", flush=True)
    parser = bundle_parser(bundle_path, ["inference.json"])
    label_map = parser.get_parsed_content("label_map")
    num_classes = int(parser.get_parsed_content("num_classes"))
    names = parser.get_parsed_content("_meta_")["network_data_format"]["outputs"]["pred"]["channel_def"]
    per_f32, per_i8, agree = [], [], []
    per_organ: dict[str, tuple[float, float]] = {}
    for image in sorted(p for p in images.iterdir() if p.name.endswith((".nii", ".nii.gz"))):
        ref = load_remapped_label(labels / image.name, label_map)
        seg32, seg8 = _seg(fp32_dir, image), _seg(int8_dir, image)
        d32, d8 = dice_per_class(seg32, ref, num_classes), dice_per_class(seg8, ref, num_classes)
        if not d32:
            raise MedPTQError(f"{labels / image.name}: no organ of the bundle's classes in the labels")
        per_f32.append(mean_dice(d32))
        per_i8.append(mean_dice(d8))
        agree.append(mean_dice(dice_per_class(seg8, seg32, num_classes)) or 0.0)
        for cls in d32:
            per_organ[f"{names.get(str(cls), cls)} ({image.name})"] = (d32[cls], d8.get(cls, 0.0))
    report = {
        "model": f"{bundle_path.name}: MONAI UNet 16-32-64-128-256, {num_classes} classes (demo weights)",
        "engine": f"{int8['engine']['engine']} ({int8['engine']['precision']}, {int8['engine']['device']})",
        "machine": machine_info(),
        "onnx_fp32_bytes": summary["fp32_bytes"],
        "onnx_int8_bytes": summary["int8_bytes"],
        "size_ratio": summary["fp32_bytes"] / summary["int8_bytes"],
        "calibrator": summary["calibrator"],
        "calibration_patches": summary["num_patches"],
        "calibration_data": str(calib_dir),
        "dice_fp32": float(np.mean(per_f32)),
        "dice_int8": float(np.mean(per_i8)),
        "dice_int8_vs_fp32": float(np.mean(agree)),
        "volume_seconds_torch_fp32": fp32["forward_seconds"],
        "volume_seconds_int8": int8["forward_seconds"],
        "volume_speedup": fp32["forward_seconds"] / int8["forward_seconds"],
        "total_seconds_torch_fp32": fp32["total_seconds"],
        "total_seconds_int8": int8["total_seconds"],
        "warmup_seconds_torch_fp32": fp32["warmup_seconds"],
        "warmup_seconds_int8": int8["warmup_seconds"],
        "per_organ_dice": per_organ,
        "volumes": fp32["volumes"],
        "outputs": {"fp32": str(fp32_dir), "int8": str(int8_dir)},
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    os.makedirs(out, exist_ok=True)
    write_text_atomic(out / "demo.json", json.dumps(report, indent=2) + "\n")
    write_text_atomic(out / "demo.md", _markdown(report))
    print(_markdown(report), flush=True)
    return report
