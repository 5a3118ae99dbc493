"""Accuracy-aware PTQ on our bundles: ``medptq quantize --max_dice_drop X`` on each demo model; writes
reports/accuracy_control.{json,md}, and with ``--apply`` makes the chosen float layers each bundle's default.

Per bundle (a scratch copy; the bundle itself is only touched by ``--apply``): the small demo model
(``small.json``; the U-Net has only its full-size demo) is quantized with the bundle's own settings on the
calibration CT of another patient, with the budget scored on the held-out abdominal CT
(``tests/data/totalseg_ct/images``) segmented whole by the bundle's inferer on the accuracy engine
(``auto``: OpenVINO). Reported: Dice drop with every layer INT8, the chosen float layers and the drop
reached, evaluations, seconds, INT8 file size, and the hand-picked list it replaces. ``--apply`` writes the
choice into ``configs/metadata.json`` (``quantization.float_layers``, ``float_layers_reason`` and
``accuracy_control``), so a plain ``medptq quantize`` reproduces it without re-running the search.

``--nncf`` (a second pass, on the bundles already in the report) runs NNCF's ``quantize_with_accuracy_control``
at the same budget on the same FP32 ONNX, calibration patches and validation patches (NNCF scores its budget on
the patches: its validation function is called once per layer group it ranks, too slow on whole volumes), and
scores both INT8 models the same way: whole-volume Dice vs FP32 through the bundle's inferer on OpenVINO, and
OpenVINO per-patch latency (median of 5) beside FP32's.

    python scripts/accuracy_control_bundles.py [--only unet_int8,segresnet_int8] [--max_dice_drop 0.005] [--apply]
    python scripts/accuracy_control_bundles.py --nncf [--only ...]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data" / "totalseg_ct"
BUNDLES = ("unet_int8", "segresnet_int8", "nnunet_int8", "swinunetr_int8", "unest_int8", "transunet_int8",
           "vista3d_int8")


def _configs(bundle: Path) -> list[str]:
    names = ["inference.json"] + (["small.json"] if (bundle / "configs" / "small.json").is_file() else [])
    return [str(bundle / "configs" / n) for n in names]


def run_bundle(bundle: Path, scratch: Path, budget: float, engine: str) -> dict[str, Any]:
    """Accuracy control on a scratch copy of ``bundle``; the row of the report."""
    copy = Path(shutil.copytree(bundle, scratch / bundle.name))
    configs = _configs(copy)
    before = json.loads((bundle / "configs" / "metadata.json").read_text(encoding="utf-8"))["quantization"]
    cmd = _quantize_cmd(copy, configs, "--val_dataset_dir", str(DATA / "images"), "--max_dice_drop", str(budget),
                        "--accuracy_engine", engine)
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    row: dict[str, Any] = {"bundle": bundle.name, "model": "small demo" if len(configs) > 1 else "demo",
                           "command": "medptq quantize B " + " ".join(cmd[5:]).replace(str(copy), "B")
                           .replace(str(ROOT) + "/", ""),
                           "hand_picked": before.get("float_layers", []), "wall_seconds": round(time.perf_counter() - start, 1)}
    if proc.returncode != 0:
        row["error"] = (proc.stderr or proc.stdout).strip().splitlines()[-1][:600]
        return row
    meta = json.loads((copy / "configs" / "metadata.json").read_text(encoding="utf-8"))["quantization"]
    control = meta["accuracy_control"]
    models = copy / "models" / ("small" if len(configs) > 1 else "")
    row.update(control)
    row["size_ratio"] = round((models / "model.onnx").stat().st_size / (models / "model_int8.onnx").stat().st_size, 2)
    row["same_as_hand_picked"] = sorted(control["float_layers"]) == sorted(row["hand_picked"])
    return row


def _quantize_cmd(copy: Path, configs: list[str], *extra: str) -> list[str]:
    return [sys.executable, "-m", "medptq_monai.cli", "quantize", str(copy), "--config_file", json.dumps(configs),
            "--dataset_dir", str(DATA / "calibration"), "--progress", "False", *extra]


def _score(model: Path, precision: str, validation: Any, num_classes: int,
           reference: np.ndarray | None) -> tuple[np.ndarray, float | None, float]:
    """(whole-volume argmax, Dice drop vs ``reference``, OpenVINO per-patch median seconds) of ``model``."""
    from medptq_monai.calibrate.accuracy_control import scored_logits
    from medptq_monai.engines import create_engine
    from medptq_monai.metrics import dice_per_class, mean_dice

    engine = create_engine("openvino", model, precision)
    pred = scored_logits(engine, validation).argmax(axis=0)
    patch = torch.from_numpy(validation.images[0])
    times = []
    with torch.no_grad():
        engine(patch)
        for _ in range(5):
            start = time.perf_counter()
            engine(patch)
            times.append(time.perf_counter() - start)
    drop = None if reference is None else 1.0 - (mean_dice(dice_per_class(pred, reference, num_classes)) or 0.0)
    return pred, drop, float(np.median(times))


def run_nncf(bundle: Path, scratch: Path, budget: float, row: dict[str, Any]) -> dict[str, Any]:
    """NNCF's accuracy control beside ours on the same inputs; both scored the same way (see module docstring)."""
    from medptq_monai.bundle.quantize_bundle import calibration_patches, validation_set
    from medptq_monai.peers import nncf_quantize_with_accuracy_control
    from medptq_monai.peers.nncf_peer import openvino_ir_bytes

    copy = Path(shutil.copytree(bundle, scratch / bundle.name))
    configs = _configs(copy)
    models = copy / "models" / ("small" if len(configs) > 1 else "")
    ours = row.get("float_layers", row["hand_picked"])  # ours unreachable: the bundle's own list
    subprocess.run(_quantize_cmd(copy, configs, "--exclude", ",".join(ours) if ours else "[]"), check=True,
                   capture_output=True)
    validation, num_classes = validation_set(copy, configs, dataset_dir=str(DATA / "calibration"),
                                             val_dataset_dir=str(DATA / "images"))
    outcome = nncf_quantize_with_accuracy_control(
        models / "model.onnx", calibration_patches(copy, configs, dataset_dir=str(DATA / "calibration")),
        validation.images, budget, num_classes, scratch / "nncf")
    reference, _, fp32_s = _score(models / "model.onnx", "fp32", validation, num_classes, None)
    _, ours_drop, ours_s = _score(models / "model_int8.onnx", "int8", validation, num_classes, reference)
    _, nncf_drop, nncf_s = _score(outcome.ir, "int8", validation, num_classes, reference)
    fp32_bytes = (models / "model.onnx").stat().st_size
    return {"fp32_patch_s": fp32_s,
            "ours": {"float_layers": len(ours), "volume_dice_drop": ours_drop, "patch_s": ours_s,
                     "size_ratio": fp32_bytes / (models / "model_int8.onnx").stat().st_size},
            "nncf": {**outcome.summary(), "ir": outcome.ir.name, "volume_dice_drop": nncf_drop, "patch_s": nncf_s,
                     "patch_dice_drop": round(1.0 - outcome.dice_vs_fp32, 5),
                     "size_ratio": fp32_bytes / openvino_ir_bytes(outcome.ir)}}


def apply_choice(bundle: Path, row: dict[str, Any]) -> None:
    """Make the measured choice the bundle's default float layers (atomic rewrite of its metadata)."""
    from medptq_monai.fileio import write_text_atomic

    meta_file = bundle / "configs" / "metadata.json"
    meta = json.loads(meta_file.read_text(encoding="utf-8"))
    quantization = meta["quantization"]
    quantization["float_layers"] = list(row["float_layers"])
    quantization["float_layers_reason"] = (
        f"chosen by accuracy control (medptq quantize --max_dice_drop {row['max_dice_drop']:g}) on the {row['model']} "
        f"model: Dice(INT8 vs FP32) drop {row['dice_drop_all_int8']:.4f} with every layer INT8, {row['dice_drop']:.4f} "
        f"with these {len(row['float_layers'])} in float, on the held-out abdominal CT segmented whole by the "
        f"bundle's inferer on {row['engine']} ({row['isa']}); reports/accuracy_control.md")
    quantization["accuracy_control"] = {k: row[k] for k in (
        "metric", "max_dice_drop", "dice_drop", "dice_drop_all_int8", "sqnr_db", "evaluations", "seconds", "engine",
        "isa", "validation_patches", "calibrator", "seed")}
    write_text_atomic(meta_file, json.dumps(meta, indent=4) + "\n")


def render_markdown(report: dict[str, Any]) -> str:
    """The report as a Markdown table."""
    lines = [f"# Accuracy-aware PTQ on the bundles (budget: Dice INT8 vs FP32 drop <= {report['max_dice_drop']:g})", "",
             "Each bundle's demo model (small where it has one), calibrated on another patient's CT with its own "
             "settings; the drop is whole-volume Dice(INT8 vs FP32), class mean over the organs the FP32 model "
             "finds, on the held-out abdominal CT segmented by the bundle's own inferer. `hand-picked`: the "
             "float layers the bundle used before.", "",
             "| bundle | drop, all INT8 | float layers chosen | drop reached | SQNR dB | evaluations | seconds | "
             "INT8 size ratio | hand-picked before | same |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in report["rows"]:
        if "error" in r:
            lines.append(f"| {r['bundle']} | failed: {r['error']} | | | | | {r['wall_seconds']} | | "
                         f"{len(r['hand_picked'])} | |")
            continue
        lines.append(f"| {r['bundle']} | {r['dice_drop_all_int8']:.4f} | {len(r['float_layers'])} | "
                     f"{r['dice_drop']:.4f} | {r['sqnr_db']:.2f} | {r['evaluations']} | {r['seconds']:.0f} | "
                     f"{r['size_ratio']:.2f}x | {len(r['hand_picked'])} | {'yes' if r['same_as_hand_picked'] else 'no'} |")
    side = [r for r in report["rows"] if "nncf_side" in r]
    if side:
        lines += ["", "## NNCF's `quantize_with_accuracy_control` at the same budget", "",
                  "Same FP32 ONNX, calibration patches and 8 validation patches; NNCF scores its budget on the patches "
                  "(Dice vs FP32, absolute drop), ours on the whole volume. Both INT8 models then scored alike: "
                  "whole-volume Dice drop vs FP32 through the bundle's inferer on OpenVINO, per-patch OpenVINO "
                  "latency (median of 5, one validation patch).", "",
                  "| bundle | FP32 ms | ours: float layers | ours: volume drop | ours ms | ours size ratio | "
                  "NNCF: ops reverted | NNCF: patch drop | NNCF: volume drop | NNCF ms | NNCF size ratio | NNCF s |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in side:
            n, o = r["nncf_side"]["nncf"], r["nncf_side"]["ours"]
            if "error" in r["nncf_side"]:
                lines.append(f"| {r['bundle']} | failed: {r['nncf_side']['error']} |" + " |" * 10)
                continue
            lines.append(
                f"| {r['bundle']} | {r['nncf_side']['fp32_patch_s'] * 1e3:.0f} | {o['float_layers']} | "
                f"{o['volume_dice_drop']:.4f} | {o['patch_s'] * 1e3:.0f} | {o['size_ratio']:.2f}x | "
                f"{n['reverted_ops']} of {n['nncf_quantized_ops']} | {n['patch_dice_drop']:.4f} | "
                f"{n['volume_dice_drop']:.4f} | {n['patch_s'] * 1e3:.0f} | {n['size_ratio']:.2f}x | {n['seconds']:.0f} |")
    lines += ["", f"Engine scoring the candidates: {report['rows'][0].get('engine', '?')} "
              f"(INT8 ISA {report['rows'][0].get('isa', '?')}). {report['machine_line']}", "",
              "Command: `" + report["command"] + "`; per bundle: `" + (report["rows"][0].get("command") or "") + "`",
              ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(BUNDLES))
    parser.add_argument("--max_dice_drop", type=float, default=0.005)
    parser.add_argument("--engine", default="auto")
    parser.add_argument("--apply", action="store_true", help="write the choice into each bundle's metadata")
    parser.add_argument("--nncf", action="store_true", help="NNCF's accuracy control beside ours (second pass)")
    parser.add_argument("--out", default="reports")
    args = parser.parse_args()

    from medptq_monai.fileio import relative_paths, write_text_atomic
    from medptq_monai.machine import machine_info, machine_line

    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in BUNDLES]
    if unknown:
        parser.error(f"unknown bundle(s) {unknown}; choose from {', '.join(BUNDLES)}")
    out = ROOT / args.out
    json_path = out / "accuracy_control.json"
    previous = json.loads(json_path.read_text()) if json_path.is_file() else {}
    rows = {r["bundle"]: r for r in previous.get("rows", []) if previous.get("max_dice_drop") == args.max_dice_drop}
    for name in names:
        with tempfile.TemporaryDirectory(prefix="medptq-ac-") as scratch:
            if args.nncf:
                if name not in rows:
                    parser.error(f"{name}: run without --nncf first (ours is the other side of the comparison)")
                row = rows[name]
                try:
                    row["nncf_side"] = run_nncf(ROOT / "bundles" / name, Path(scratch), args.max_dice_drop, row)
                except Exception as err:  # one failing bundle must not lose the others
                    row["nncf_side"] = {"error": f"{type(err).__name__}: {str(err)[:300]}"}
            else:
                row = run_bundle(ROOT / "bundles" / name, Path(scratch), args.max_dice_drop, args.engine)
        print(json.dumps({k: row.get(k) for k in ("bundle", "dice_drop_all_int8", "dice_drop", "evaluations",
                                                     "seconds", "error")}), flush=True)
        if args.apply and not args.nncf and "error" not in row:
            apply_choice(ROOT / "bundles" / name, row)
        rows[name] = relative_paths(row, ROOT)
        machine = machine_info()
        report = {"schema": "medptq-accuracy-control-v1", "max_dice_drop": args.max_dice_drop,
                  "rows": [rows[b] for b in BUNDLES if b in rows], "machine": machine,
                  "machine_line": machine_line(machine),
                  "command": "python scripts/accuracy_control_bundles.py " + " ".join(sys.argv[1:])}
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(json_path, json.dumps(report, indent=2) + "\n")
        write_text_atomic(out / "accuracy_control.md", render_markdown(report))


if __name__ == "__main__":
    main()
