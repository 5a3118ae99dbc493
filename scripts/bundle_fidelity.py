"""INT8 fidelity of every bundle's small demo model on the real CT: reports/fidelity.{json,md}.

For each bundle with ``configs/small.json``: calibrate the shipped ``models/small/model.pt`` on another
patient's CT (the bundle's calibrator, patch count and float layers), segment the whole abdominal CT with
torch FP32 and the INT8 engine, and compare (``medptq_monai.fidelity.check_fidelity``).

    python scripts/bundle_fidelity.py [--only segresnet_int8,swinunetr_int8] [--out reports]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

from medptq_monai.fidelity import check_fidelity
from medptq_monai.fileio import relative_paths, write_text_atomic
from medptq_monai.machine import machine_info, machine_line

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundles", default=str(ROOT / "bundles"))
    ap.add_argument("--data", default=str(ROOT / "tests" / "data" / "totalseg_ct"))
    ap.add_argument("--only", default="", help="comma-separated bundle names")
    ap.add_argument("--out", default=str(ROOT / "reports"))
    args = ap.parse_args()
    names = [n for n in args.only.split(",") if n] or sorted(
        p.name for p in Path(args.bundles).iterdir() if (p / "configs" / "small.json").is_file())
    rows = []
    for name in names:
        with tempfile.TemporaryDirectory() as tmp:
            # a scratch copy: calibrating must not replace the bundle's own models/small/*.onnx
            bundle = shutil.copytree(Path(args.bundles) / name, Path(tmp) / name,
                                     ignore=shutil.ignore_patterns("*.onnx", "eval", ".cache"))
            r = check_fidelity(bundle, args.data, Path(tmp) / "out", overlays=["small.json"],
                               log=lambda m: print(f"{name}: {m}", flush=True))
        r.pop("outputs")
        r["date"] = machine_info()["date"]
        rows.append(r)
    out = Path(args.out)
    old = out / "fidelity.json"
    if old.is_file():  # a partial run (--only) replaces its bundles' rows and keeps the others
        rows = sorted([r for r in json.loads(old.read_text())["rows"] if r["bundle"] not in names] + rows,
                      key=lambda r: r["bundle"])
    report = relative_paths({"machine": machine_info(), "rows": rows})  # paths relative to the working folder
    lines = ["# INT8 fidelity of the small demo models on the real CT", "",
             "Calibrated on another patient's CT; whole-volume sliding window on the abdominal CT "
             "(tests/data/totalseg_ct/images), labels remapped to the 13 organs; Dice over organs present.", "",
             "| bundle | calibrator, patches | float nodes (incl. attention MatMuls) | ONNX FP32 / INT8 bytes | size ratio | Dice FP32 "
             "| Dice INT8 | ΔDice | Dice INT8 vs FP32 | volume s torch FP32 / INT8 | INT8 engine, ISA |",
             "|---|---|---:|---|---:|---:|---:|---:|---:|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['bundle']} | {r['calibrator']}, {r['calibration_patches']} | {len(r['excluded_nodes'])} "
            f"| {r['onnx_fp32_bytes']:,} / {r['onnx_int8_bytes']:,} | {r['size_ratio']:.2f}x | {r['dice_fp32']:.4f} "
            f"| {r['dice_int8']:.4f} | {r['dice_int8'] - r['dice_fp32']:+.4f} | {r['dice_int8_vs_fp32']:.4f} "
            f"| {r['volume_seconds_torch_fp32']:.2f} / {r['volume_seconds_int8']:.2f} "
            f"| {r['engine'].split(' ')[0]}, {r.get('int8_isa')}{'*' if str(r.get('int8_model')).startswith('sat') else ''} |")
    m = report["machine"]
    lines += ["", "`*`: the engine ran the saturation-safe copy of the INT8 file (an INT8 path that sums products in "
              "16 bits, e.g. AVX2; shown on an AVX-512/AMX host with `ONEDNN_MAX_CPU_ISA=AVX2`).", "",
              f"{machine_line(m)} Command: `python scripts/bundle_fidelity.py` "
              "(`--only NAME` re-measures one bundle's row; `--out DIR` writes elsewhere).", ""]
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(old, json.dumps(report, indent=2) + "\n")
    write_text_atomic(out / "fidelity.md", "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
