"""The all-bundles benchmark (``medptq bench``): every bundle at its full-size default, one run, one machine.

Per bundle: export + INT8 calibration in a subprocess (peak RSS = ``calib_peak_bytes``), ONNX sizes, and
per-patch latency (median) of torch FP32 eager, ONNX Runtime FP32/INT8 and OpenVINO FP32/INT8 on one
real CT patch, with the output SQNR of each engine's logits vs torch FP32. With NNCF installed (the
``peer`` extra), NNCF's ``nncf.quantize`` of the same FP32 ONNX on the same calibration patches runs on
OpenVINO beside medptq's INT8: latency, IR size, SQNR and Dice vs FP32 for both. Bundles without full-size
weights get seeded random weights (``weights: "random, seed 0"``): timing, size, memory and SQNR do not
need trained weights. Writes ``benchmark.json``, ``benchmark.md`` and ``benchmark.png`` atomically.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import time
from collections.abc import Sequence
from itertools import groupby
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .benchmark import (
    CPU_ROWS, MAX_REPEATS, RowSpec, _fmt, _plain, cut_patch, run_calibration, time_calls, time_interleaved,
    write_reports,
)
from .bundle.paths import paired_datalist
from .bundle.quantize_bundle import calibration_patches
from .bundle.runner import bundle_parser
from .calibrate.ort_outputs import SUMMARY_KEY as ORT_CHOICE_KEY
from .engines import create_engine
from .engines.tensorrt_engine import tensorrt_available
from .export.onnx_model import load_onnx, metadata
from .errors import InputImageError, MedPTQError, UnknownNameError
from .fileio import atomic_path
from .machine import machine_info, machine_line
from .metrics import dice_per_class, mean_dice, sqnr_db
from .peers.nncf_peer import nncf_quantize, nncf_version, openvino_ir_bytes

logger = logging.getLogger(__name__)

SCHEMA = "medptq-benchmark-suite-v1"
MIB = 1 << 20
# quick: 3 timed calls, more while a row has timed under 3 s (one 0.4 s call gave the U-Net's ORT INT8/FP32 0.83x
# where quiet interleaved rounds gave 1.04x; one 21 s call of VISTA3D's ORT varies by 10%)
QUICK = {"repeats": 3, "warmup": 1, "calib_patches": 2, "min_seconds": 3.0}
NNCF_KEY = "nncf_openvino_int8"


def row_key(spec: RowSpec) -> str:
    """``"openvino_int8"``-style key of a row in ``patch_seconds`` / ``sqnr_db_by_engine``."""
    return f"{spec.engine}_{spec.precision}"


def find_bundles(bundles_dir: str | os.PathLike, only: str | Sequence[str] | None = None) -> list[Path]:
    """Bundle folders (with ``configs/metadata.json``) under ``bundles_dir``, sorted; ``only`` picks names."""
    root = Path(bundles_dir).resolve()
    found = {p.name: p for p in sorted(root.iterdir()) if (p / "configs" / "metadata.json").is_file()} \
        if root.is_dir() else {}
    if not found:
        raise MedPTQError(f"no bundles (folders with configs/metadata.json) under {root}")
    if only is None or only == "":
        return list(found.values())
    names = [n.strip() for n in (only.split(",") if isinstance(only, str) else only) if str(n).strip()]
    unknown = [n for n in names if n not in found]
    if unknown:
        raise UnknownNameError(f"unknown bundle(s) {unknown}; found {', '.join(found)}")
    return [found[n] for n in names]


def _weights(net: torch.nn.Module, bundle: Path, work: Path) -> tuple[Path, str]:
    """The full-size checkpoint: the bundle's own ``models/model.pt``, else ``net``'s (seeded random) weights
    saved in ``work``."""
    shipped = bundle / "models" / "model.pt"
    if shipped.is_file():
        return shipped, "shipped models/model.pt"
    path = work / "random_seed0.pt"
    with atomic_path(path, suffix=".pt") as tmp:
        torch.save(net.state_dict(), tmp)
    return path, "random, seed 0 (no full-size weights shipped)"


def _real_patch(parser: Any, data: Path, roi: Sequence[int]) -> torch.Tensor:
    pair = paired_datalist(data)[0]
    item = parser.get_parsed_content("preprocessing")(dict(pair))
    image, label = _plain(item["image"]).float(), _plain(item["label"])[0].numpy()
    return cut_patch(image, label, roi)


def _static_checks(int8: Path) -> dict[str, Any]:
    """``onnx.checker`` and the TensorRT explicit-quantization check of the full-size INT8 ONNX."""
    import onnx

    from .export.trt_check import check_qdq_for_tensorrt, count_float_weight_qdq

    model = onnx.load(str(int8))
    try:
        onnx.checker.check_model(model)
        checker = "ok"
    except Exception as err:  # reported, not fatal: the timings still say something
        checker = f"{type(err).__name__}: {err}"
    issues = check_qdq_for_tensorrt(model)
    return {"onnx_checker": checker, "tensorrt_check_issues": issues[:10],
            "float_weight_qdq": count_float_weight_qdq(model)}


def dice_vs_fp32(reference: np.ndarray, logits: np.ndarray, num_classes: int) -> float | None:
    """Class-mean foreground Dice of the argmax of ``logits`` vs the argmax of FP32 ``reference`` (None: FP32 has no
    foreground)."""
    return mean_dice(dice_per_class(logits.argmax(1), reference.argmax(1), num_classes))


def bench_nncf(bundle: Path, calib_dir: Path, models: Path, patch: torch.Tensor, reference: np.ndarray | None,
               num_classes: int, warmup: int, repeats: int, calib_patches: int | None) -> dict[str, Any]:
    """NNCF's ``nncf.quantize`` of ``models/model.onnx`` on the patches ``medptq quantize`` calibrated on (same
    bundle, data, count, seed), run by the OpenVINO engine on ``patch``; ``status`` "not installed" without NNCF."""
    version = nncf_version()
    if version is None:
        return {"status": "not installed"}
    patches = calibration_patches(bundle, num_patches=calib_patches, heldout_patches=0, dataset_dir=str(calib_dir),
                                  models_dir=str(models))
    fp32 = models / "model.onnx"
    other_size = tuple(patches[0].shape[2:]) != tuple(patch.shape[2:])
    start = time.perf_counter()
    xml = nncf_quantize(fp32, patches, models, calibrate_at_patch_size=other_size)
    out: dict[str, Any] = {"status": "ok", "version": version, "quantize_seconds": time.perf_counter() - start,
                           "calib_patches": len(patches), "calib_roi_size": [int(d) for d in patches[0].shape[2:]],
                           "ir_bytes": openvino_ir_bytes(xml)}
    del patches
    engine = result = None
    try:
        with torch.no_grad():
            engine = create_engine("openvino", xml, "int8", "cpu")
            times, result = time_calls(lambda: engine(patch), warmup, repeats)
            logits = _plain(result).float().cpu().numpy()
            info = engine.describe()
            precisions = engine.runtime_precisions()
    finally:
        engine = result = None
        gc.collect()
    convolutions = {p: n for (layer, p), n in precisions.items() if layer in ("Convolution", "Deconvolution")}
    out.update(patch_seconds=float(np.median(times)), patch_times_s=times, isa=info.get("isa"),
               int8_convolutions=sum(n for p, n in convolutions.items() if p in ("u8", "i8")),
               convolutions=sum(convolutions.values()))
    if reference is not None:
        out["sqnr_db"] = sqnr_db(reference, logits)
        out["dice_vs_fp32"] = dice_vs_fp32(reference, logits, num_classes)
    return out


def bench_bundle(bundle: Path, data: Path, work: Path, repeats: int, warmup: int,
                 calib_patches: int | None, nncf: bool = True, min_seconds: float = 0.0) -> dict[str, Any]:
    """Measure one bundle at its full-size default (see the module docstring); returns its row. Each engine
    gets ``repeats`` timed calls, more while they total under ``min_seconds``; one runtime's FP32 and INT8 are
    timed in alternating rounds (``time_interleaved``), so their ratio does not depend on when each ran."""
    work.mkdir(parents=True, exist_ok=True)
    parser = bundle_parser(bundle, ["inference.json"])
    meta = parser.get_parsed_content("_meta_")
    roi = [int(r) for r in parser.get_parsed_content("roi_size")]
    in_channels, num_classes = int(parser.get_parsed_content("in_channels")), int(parser.get_parsed_content(
        "num_classes"))
    torch.manual_seed(0)
    net = parser.get_parsed_content("network_def", lazy=False)  # built once: parameter count and random weights
    params = int(sum(p.numel() for p in net.parameters()))
    checkpoint, weights = _weights(net, bundle, work)
    del net
    models = work / "models"
    calib_dir = data / "calibration" if (data / "calibration").is_dir() else data / "images"
    calibration = run_calibration(bundle, calib_dir, calib_patches,
                                  overrides={"models_dir": str(models), "checkpoint": str(checkpoint)})
    fp32, int8 = models / "model.onnx", models / "model_int8.onnx"
    patch = _real_patch(parser, data, roi)
    row: dict[str, Any] = {
        "model": bundle.name.removesuffix("_int8"), "bundle": bundle.name, "params": params, "roi_size": roi,
        "weights": weights, "onnx_fp32_bytes": fp32.stat().st_size, "onnx_int8_bytes": int8.stat().st_size,
        "calib_peak_bytes": calibration["calib_peak_bytes"], "calib_seconds": calibration["seconds"],
        "calib_patches": calib_patches, "float_layers": len(meta.get("quantization", {}).get("float_layers", [])),
        "patch_seconds": {}, "patch_times_s": {}, "sqnr_db_by_engine": {}, "errors": {}, "int8_isa": {},
        "dice_vs_fp32": {},
    }
    int8_meta = metadata(load_onnx(int8, load_weights=False))
    calib_roi = int8_meta.get("medptq.calibration_roi")
    choice = int8_meta.get(ORT_CHOICE_KEY)  # what medptq quantize chose for ONNX Runtime (calibrate/ort_outputs.py)
    row["ort_output_quantizers"] = json.loads(choice) if choice else None
    row["calib_roi_size"] = [int(d) for d in calib_roi.split("x")] if calib_roi else roi
    row["size_ratio"] = row["onnx_fp32_bytes"] / row["onnx_int8_bytes"]
    row.update(_static_checks(int8))
    reference = None
    for _, group in groupby(CPU_ROWS, key=lambda spec: spec.engine):  # one runtime's precisions timed interleaved
        specs, engines = [], []
        for spec in group:
            logger.info("bench %s: %s", bundle.name, spec.label)
            try:
                engines.append(create_engine(
                    spec.engine, int8 if spec.precision == "int8" else fp32, spec.precision, "cpu",
                    torch_network=parser.get_parsed_content("network_def", lazy=False)
                    if spec.engine == "torch" else None,
                    checkpoint=checkpoint, in_channels=in_channels, num_classes=num_classes,
                ))
                specs.append(spec)
            except Exception as err:  # one failing engine must not lose the other measurements
                logger.exception("bench %s: %s failed", bundle.name, spec.label)
                row["errors"][row_key(spec)] = f"{type(err).__name__}: {err}"
        try:
            with torch.no_grad():
                timed = time_interleaved([lambda e=e: e(patch) for e in engines], warmup, repeats,
                                         min_seconds=min_seconds)
        except Exception as err:
            logger.exception("bench %s: %s failed", bundle.name, ", ".join(s.label for s in specs))
            row["errors"].update({row_key(s): f"{type(err).__name__}: {err}" for s in specs})
            specs, timed = [], []
        for spec, engine, (times, out) in zip(specs, engines, timed):
            key = row_key(spec)
            info = engine.describe()
            if spec.precision == "int8" and "isa" in info:  # the INT8 path it really took
                row["int8_isa"][spec.engine] = {k: info.get(k) for k in ("isa", "int8_model")}
            logits = _plain(out).float().cpu().numpy()
            row["patch_seconds"][key] = float(np.median(times))
            row["patch_times_s"][key] = times
            if spec.engine == "torch":
                reference = logits
            elif reference is not None:
                row["sqnr_db_by_engine"][key] = sqnr_db(reference, logits)
                if key == "openvino_int8":
                    row["dice_vs_fp32"][key] = dice_vs_fp32(reference, logits, num_classes)
        engines = timed = out = logits = None
        gc.collect()
    row["nncf"] = {"status": "off"}
    if nncf:
        logger.info("bench %s: NNCF INT8 (OpenVINO)", bundle.name)
        try:
            row["nncf"] = bench_nncf(bundle, calib_dir, models, patch, reference, num_classes, warmup, repeats,
                                     calib_patches)
        except Exception as err:  # the peer failing must not lose medptq's own measurements
            logger.exception("bench %s: NNCF failed", bundle.name)
            row["nncf"] = {"status": "failed"}
            row["errors"][NNCF_KEY] = f"{type(err).__name__}: {err}"
        if "dice_vs_fp32" in row["nncf"]:
            row["dice_vs_fp32"][NNCF_KEY] = row["nncf"]["dice_vs_fp32"]
    reference = None
    ps = row["patch_seconds"]
    row["sqnr_db"] = row["sqnr_db_by_engine"].get("openvino_int8", row["sqnr_db_by_engine"].get("onnxruntime_int8"))
    row["speedup_openvino_int8_vs_torch"] = (ps["torch_fp32"] / ps["openvino_int8"]
                                             if {"torch_fp32", "openvino_int8"} <= set(ps) else None)
    for engine in ("onnxruntime", "openvino"):  # INT8 vs the same runtime's FP32
        fp, i8 = ps.get(f"{engine}_fp32"), ps.get(f"{engine}_int8")
        row[f"speedup_{engine}_int8_vs_fp32"] = fp / i8 if fp and i8 else None
    return row


def _isa_cell(row: dict[str, Any]) -> str:
    """``avx2* / amx``: each CPU engine's INT8 path; ``*`` marks a saturation-safe copy of the model."""
    cells = []
    for engine in ("openvino", "onnxruntime"):
        info = row.get("int8_isa", {}).get(engine)
        cells.append("—" if not info else info["isa"] + ("*" if info.get("int8_model", "").startswith("sat") else ""))
    return " / ".join(cells)


def _more_calls(settings: dict[str, Any]) -> str:
    seconds = settings.get("min_seconds") or 0
    return f", more (up to {MAX_REPEATS}) while an engine's timed calls total under {seconds:g} s" if seconds else ""


def _interleaved(settings: dict[str, Any]) -> str:
    return "; a runtime's FP32 and INT8 calls alternate (rounds)" if settings.get("timing") == "interleaved" else ""


def _ort_choices(rows: Sequence[dict[str, Any]]) -> str:
    """One line: the ONNX Runtime output quantizers each INT8 file records (chosen / candidates, or why none)."""
    cells = []
    for r in rows:
        c = r.get("ort_output_quantizers")
        if c:
            cells.append(f"{r['bundle']} {c['chosen']}/{c['candidates']}" if c.get("candidates")
                         else f"{r['bundle']} none ({c.get('reason', '')})")
    budgets = sorted({r["ort_output_quantizers"]["budget_db"] for r in rows if r.get("ort_output_quantizers")})
    return ("ONNX Runtime output quantizers recorded in each INT8 file (chosen / candidates at a budget of "
            f"{', '.join(f'{b:g}' for b in budgets)} dB; `calibrate/ort_outputs.py`): {'; '.join(cells) or 'none'}.")


def render_markdown(report: dict[str, Any]) -> str:
    """One table row per bundle: params, sizes, per-patch ms per engine, SQNR, calibration memory."""
    keys = [row_key(s) for s in CPU_ROWS]
    s, m = report["settings"], report["machine"]
    head = " | ".join(f"{s_.label} ms" for s_ in CPU_ROWS)
    lines = [
        "# medptq-monai benchmark: all bundles at full size", "",
        f"Per patch: one real CT patch at each bundle's roi (batch 1), {s['warmup']} warm-up + {s['repeats']} timed "
        f"call(s){_more_calls(s)}, median{_interleaved(s)}. INT8 calibration: "
        f"{s['calib_patches'] or 'bundle default'} patches of another patient's CT, in a subprocess whose peak RSS "
        "is reported. SQNR: INT8 logits (OpenVINO) vs torch FP32 on the same patch. Weights: random (seed 0) where "
        "no full-size weights ship.", "",
        f"| bundle | params (M) | roi | ONNX FP32 MB | ONNX INT8 MB | size ratio | {head} | INT8 ISA (OV / ORT) "
        "| OV INT8 vs torch | OV INT8 vs OV FP32 | ORT INT8 vs ORT FP32 | SQNR dB OV / ORT | calib peak GiB "
        "| checker / TensorRT check |",
        "|---|---:|---|---:|---:|---:|" + "---:|" * len(keys) + "---|---:|---:|---:|---:|---:|---|",
    ]
    notes = []
    for r in report["rows"]:
        if "error" in r:
            lines.append(f"| {r['bundle']} (failed) |" + " — |" * (len(keys) + 12))
            notes.append(f"- {r['bundle']}: {r['error']}")
            continue
        times = " | ".join(_fmt(r["patch_seconds"].get(k), ".0f", 1e3) for k in keys)
        calib = _fmt(r["calib_peak_bytes"], ".2f", 1 / (1 << 30))
        if r.get("calib_roi_size", r["roi_size"]) != r["roi_size"]:
            calib += f" ({'x'.join(map(str, r['calib_roi_size']))} patches)"
        lines.append(
            f"| {r['bundle']} | {r['params'] / 1e6:.1f} | {'x'.join(map(str, r['roi_size']))} "
            f"| {r['onnx_fp32_bytes'] / 1e6:.1f} | {r['onnx_int8_bytes'] / 1e6:.1f} | {r['size_ratio']:.2f}x "
            f"| {times} | {_isa_cell(r)} | {_fmt(r['speedup_openvino_int8_vs_torch'], '.2f', suffix='x')} "
            f"| {_fmt(r.get('speedup_openvino_int8_vs_fp32'), '.2f', suffix='x')} "
            f"| {_fmt(r.get('speedup_onnxruntime_int8_vs_fp32'), '.2f', suffix='x')} "
            f"| {_fmt(r['sqnr_db_by_engine'].get('openvino_int8'), '.1f')} / "
            f"{_fmt(r['sqnr_db_by_engine'].get('onnxruntime_int8'), '.1f')} | {calib} "
            f"| {'ok' if r['onnx_checker'] == 'ok' else 'FAIL'} / "
            f"{'ok' if not r['tensorrt_check_issues'] else str(len(r['tensorrt_check_issues'])) + ' issue(s)'} |"
        )
        notes += [f"- {r['bundle']} {k}: {v}" for k, v in r["errors"].items()]
    lines += ["", _ort_choices(report["rows"])]
    lines += nncf_table(report)
    trt = report["tensorrt"]
    lines += [
        "", *notes, *([""] if notes else []),
        f"TensorRT: {'usable' if trt['usable'] else 'not measured — ' + trt['reason']}.", "",
        "INT8 ISA: the INT8 path each CPU engine took; `*`: it ran the saturation-safe copy of the INT8 file "
        "(u8 ReLU inputs, 7-bit weights where the input is signed) because that path sums INT8 products in 16 bits.",
        "",
        f"{machine_line(m)} The run took {report['seconds'] / 60:.1f} min.", "",
        f"Command: `{' '.join(m['command'])}`", "",
    ]
    return "\n".join(lines)


def nncf_table(report: dict[str, Any]) -> list[str]:
    """Markdown lines: medptq's OpenVINO INT8 and NNCF's side by side per bundle (nothing when NNCF was off)."""
    state = report["settings"].get("nncf", "off")
    if state == "off":
        return []
    lines = ["", "## NNCF side by side", ""]
    if state == "not installed":
        return lines + ["NNCF INT8 (OpenVINO): not installed (`pip install 'medptq-monai[peer]'`).", ""]
    lines += [
        f"NNCF {state}: `nncf.quantize` with NNCF's defaults on the same FP32 ONNX and the same calibration patches "
        "as medptq, run by the same OpenVINO engine on the same patch. Size: medptq's INT8 ONNX vs NNCF's IR "
        "(.xml + .bin). SQNR and Dice (argmax, mean over foreground classes) vs torch FP32.", "",
        "| bundle | OV INT8 ms medptq / NNCF | medptq vs NNCF speed | INT8 MB medptq / NNCF | SQNR dB medptq / NNCF "
        "| Dice vs FP32 medptq / NNCF | NNCF INT8 convs | NNCF quantize s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        peer = r.get("nncf", {})
        if "error" in r or peer.get("status") != "ok":
            lines.append(f"| {r['bundle']} | {peer.get('status', 'failed')} |" + " — |" * 6)
            continue
        ours = r["patch_seconds"].get("openvino_int8")
        speed = ours and peer["patch_seconds"] / ours
        dice = r.get("dice_vs_fp32", {})
        lines.append(
            f"| {r['bundle']} | {_fmt(ours, '.0f', 1e3)} / {_fmt(peer['patch_seconds'], '.0f', 1e3)} "
            f"| {_fmt(speed, '.2f', suffix='x')} | {r['onnx_int8_bytes'] / 1e6:.1f} / {peer['ir_bytes'] / 1e6:.1f} "
            f"| {_fmt(r['sqnr_db_by_engine'].get('openvino_int8'), '.1f')} / {_fmt(peer.get('sqnr_db'), '.1f')} "
            f"| {_fmt(dice.get('openvino_int8'), '.4f')} / {_fmt(dice.get(NNCF_KEY), '.4f')} "
            f"| {peer['int8_convolutions']} of {peer['convolutions']} | {peer['quantize_seconds']:.0f} |")
    return lines + ["", "medptq vs NNCF speed: NNCF's per-patch time over medptq's (above 1: medptq is faster).", ""]


def plot_report(report: dict[str, Any], path: Path) -> None:
    """Grouped bars: per-patch median (ms, log scale) per bundle and engine; written atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = [r for r in report["rows"] if "error" not in r]
    fig = Figure(figsize=(12, 4.8))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    width = 0.8 / len(CPU_ROWS)
    for i, spec in enumerate(CPU_ROWS):
        values = [r["patch_seconds"].get(row_key(spec), np.nan) * 1e3 for r in rows]
        ax.bar(np.arange(len(rows)) + i * width, values, width, label=spec.label)
    ax.set_xticks(np.arange(len(rows)) + 0.4 - width / 2, [r["bundle"] for r in rows], fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("per-patch median (ms, log)")
    ax.legend(fontsize=7)
    ax.set_title(f"medptq-monai, full-size bundles — {report['machine']['summary']}", fontsize=9)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)


def run_suite(
    bundles_dir: str = "bundles",
    data_dir: str = "tests/data/totalseg_ct",
    out_dir: str = "reports",
    only: str | Sequence[str] | None = None,
    quick: bool = False,
    repeats: int = 3,
    warmup: int = 1,
    calib_patches: int | None = 8,
    threads: int | None = None,
    nncf: bool = True,
) -> dict[str, Any]:
    """Benchmark every bundle under ``bundles_dir`` (or ``only``, comma-separated names) at full size.

    ``data_dir`` holds ``images/`` + ``labels/`` (the patch is cut around the labelled organs) and
    ``calibration/`` (another patient, used for calibration). ``quick`` sets repeats=3 (more while an
    engine's calls total under 3 s), warmup=1 and 2 calibration patches. Work files go to
    ``<out_dir>/work/<bundle>``; the report to ``<out_dir>/benchmark.{json,md,png}``. A bundle that fails
    gets an ``error`` row; the rest still run.
    ``nncf``: add NNCF's INT8 of each bundle (row ``nncf``; "not installed" without the ``peer`` extra).
    """
    bundles = find_bundles(bundles_dir, only)
    data = Path(data_dir).resolve()
    if not (data / "images").is_dir() or not (data / "labels").is_dir():
        raise InputImageError(f"benchmark data needs {data / 'images'} and {data / 'labels'}")
    min_seconds = 0.0
    if quick:
        repeats, warmup, calib_patches = QUICK["repeats"], QUICK["warmup"], QUICK["calib_patches"]
        min_seconds = QUICK["min_seconds"]
    repeats, warmup = max(int(repeats), 1), max(int(warmup), 0)
    out = Path(out_dir).resolve()
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    start = time.perf_counter()
    rows = []
    try:
        for bundle in bundles:
            logger.info("benchmark: %s", bundle.name)
            began = time.perf_counter()
            try:
                row = bench_bundle(bundle, data, out / "work" / bundle.name, repeats, warmup, calib_patches, nncf,
                                   min_seconds)
            except Exception as err:  # keep the other bundles' rows
                logger.exception("benchmark of %s failed", bundle.name)
                row = {"model": bundle.name, "bundle": bundle.name, "error": f"{type(err).__name__}: {err}"}
            row["seconds"] = time.perf_counter() - began
            rows.append(row)
            print(f"benchmark: {bundle.name} done in {row['seconds']:.0f} s", flush=True)
    finally:
        torch.set_num_threads(previous)
    usable, reason = tensorrt_available()
    report = {
        "schema": SCHEMA,
        "settings": {"bundles_dir": str(Path(bundles_dir).resolve()), "data_dir": str(data), "quick": bool(quick),
                     "repeats": repeats, "min_seconds": min_seconds, "timing": "interleaved", "warmup": warmup,
                     "calib_patches": calib_patches, "threads": threads,
                     "engines": [row_key(s) for s in CPU_ROWS],
                     "nncf": (nncf_version() or "not installed") if nncf else "off"},
        "machine": machine_info(),
        "tensorrt": {"usable": usable, "reason": reason},
        "seconds": time.perf_counter() - start,
        "rows": rows,
    }
    write_reports(report, out, "benchmark", render_markdown, plot_report)
    return report
