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

from .errors import MedPTQError
from .fidelity import check_fidelity
from .fileio import relative_paths, write_text_atomic
from .machine import machine_info


def _markdown(report: dict) -> str:
    rows = [
        ("model", report["model"]),
        ("calibration", f"{report['calibrator']}, {report['calibration_patches']} patches from "
         f"{Path(report['calibration_data']).name}/"),
        ("engine (INT8)", report["engine"]),
        ("INT8 ISA, model", f"{report.get('int8_isa')}, {report.get('int8_model')}"),
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
    bundle_path, out = Path(bundle).resolve(), Path(out_dir).resolve()
    checkpoint = bundle_path / "models" / "model.pt"
    if not checkpoint.is_file():
        raise MedPTQError(f"demo checkpoint missing: {checkpoint} (it ships with the repository)")
    result = check_fidelity(bundle_path, data_dir, out / "demo_out", engine, log=lambda m: print(m, flush=True))
    report = relative_paths({
        "model": f"{bundle_path.name}: MONAI UNet 16-32-64-128-256 (demo weights)",
        **{k: v for k, v in result.items() if k not in ("bundle", "overlays", "excluded_nodes")},
        "machine": machine_info(),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    })
    os.makedirs(out, exist_ok=True)
    write_text_atomic(out / "demo.json", json.dumps(report, indent=2) + "\n")
    write_text_atomic(out / "demo.md", _markdown(report))
    print(_markdown(report), flush=True)
    return report
