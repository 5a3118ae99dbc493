"""TensorRT variants of the INT8 file measured on the CPU engines: FP16 remainder and ConvTranspose rewrite.

For each model (the demo U-Net from ``medptq demo``; the small nnU-Net bundle, whose decoder has
stride-2 kernel-2 ConvTranspose3d) this writes four INT8 files from ONE calibration (same activation
ranges): INT8+FP32 (the default), INT8+FP16 remainder, INT8+FP32 with the deconv rewrite, and both.
It then measures, against the FP32 ONNX on held-out real-CT patches, SQNR of the logits and argmax
agreement / mean Dice on ONNX Runtime CPU and OpenVINO CPU, the OpenVINO runtime precision of the
up-sampling layers, and OpenVINO per-patch latency with the variants interleaved (several rounds,
medians). TensorRT is not installed here: none of this ran on TensorRT or a GPU.

    python scripts/trt_variants.py [--rounds 7] [--out reports/trt_variants]

writes ``reports/trt_variants.json`` and ``.md`` (atomically).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from medptq_monai.calibrate.calibrators import DEFAULT_CALIBRATOR  # noqa: E402
from medptq_monai.calibrate.patches import PatchPlan, sample_patches  # noqa: E402
from medptq_monai.calibrate.quantize import QuantizeOptions, apply_tensorrt_variants_file, quantize_onnx  # noqa: E402
from medptq_monai.engines.openvino_engine import OpenVinoEngine  # noqa: E402
from medptq_monai.export.onnx_model import metadata  # noqa: E402
from medptq_monai.export.torch_export import export_fp32  # noqa: E402
from medptq_monai.export.trt_check import check_qdq_for_tensorrt  # noqa: E402
from medptq_monai.fileio import relative_paths, write_text_atomic  # noqa: E402
from medptq_monai.machine import machine_info, machine_line  # noqa: E402
from medptq_monai.metrics import dice_per_class, mean_dice, sqnr_db  # noqa: E402

VARIANTS = {  # name -> (high_precision, rewrite_deconv)
    "int8+fp32": ("fp32", False),
    "int8+fp16": ("fp16", False),
    "int8+fp32 rewrite": ("fp32", True),
    "int8+fp16 rewrite": ("fp16", True),
}
CT = ROOT / "tests/data/totalseg_ct"


def _volume(path: Path, pixdim: tuple[float, ...], window: tuple[float, float] | None,
            norm: tuple[float, float, float, float] | None) -> np.ndarray:
    """A CT volume, RAS, resampled to ``pixdim``; HU window to [0, 1] (MONAI bundles) or nnU-Net's
    CTNormalization (clip to percentiles, then (x - mean) / std)."""
    from monai.transforms import Compose, EnsureChannelFirst, LoadImage, Orientation, Spacing

    vol = Compose([LoadImage(image_only=True), EnsureChannelFirst(), Orientation("RAS"),
                   Spacing(pixdim, mode="bilinear")])(str(path))
    arr = np.asarray(vol, dtype=np.float32)
    if window is not None:
        arr = np.clip((arr - window[0]) / (window[1] - window[0]), 0.0, 1.0)
    if norm is not None:
        lo, hi, mean, std = norm
        arr = (np.clip(arr, lo, hi) - mean) / std
    return arr.astype(np.float32)


def _patches(vol: np.ndarray, roi: tuple[int, ...], n: int, seed: int) -> np.ndarray:
    return np.concatenate(list(sample_patches([vol], PatchPlan(roi_size=roi, num_patches=n, seed=seed))))


def _ort(path: Path, x: np.ndarray) -> np.ndarray:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i:i + 1]})[0] for i in range(len(x))])


def _fidelity(ref: np.ndarray, got: np.ndarray) -> dict[str, float | None]:
    a, b = ref.argmax(1), got.argmax(1)
    return {"sqnr_db": round(sqnr_db(ref, got), 2), "argmax_agreement": round(float((a == b).mean()), 5),
            "mean_dice_vs_fp32": _round(mean_dice(dice_per_class(b, a, ref.shape[1])))}


def _round(v: float | None) -> float | None:
    return None if v is None else round(float(v), 4)


def _upsampling_precisions(engine: OpenVinoEngine) -> dict[str, int]:
    counts = engine.runtime_precisions(1)
    return {f"{layer} {prec}": int(c) for (layer, prec), c in sorted(counts.items())
            if layer in ("Convolution", "Deconvolution")}


def _variants(fp32: Path, int8: Path, work: Path) -> dict[str, Path]:
    files = {"int8+fp32": int8}
    for name, (hp, rw) in VARIANTS.items():
        if name == "int8+fp32":
            continue
        out = work / f"{int8.stem}.{name.replace('+', '_').replace(' ', '_')}.onnx"
        apply_tensorrt_variants_file(int8, hp, rw, fp32, out_path=out)
        files[name] = out
    return files


def _measure(label: str, fp32: Path, files: dict[str, Path], x: np.ndarray, rounds: int, threads: int) -> dict:
    print(f"[{label}] reference and fidelity on {len(x)} patches", flush=True)
    ref = _ort(fp32, x)
    ov_fp32 = OpenVinoEngine(fp32, precision="fp32")
    ref_ov = ov_fp32(torch.from_numpy(x)).numpy()
    rows: dict[str, dict] = {}
    engines = {}
    for name, path in files.items():
        meta = metadata(onnx.load(str(path), load_external_data=False))
        engine = OpenVinoEngine(path, precision="int8")
        engines[name] = engine
        rows[name] = {
            "file": str(path), "bytes": path.stat().st_size,
            "tensorrt_check_issues": len(check_qdq_for_tensorrt(path)),
            "deconv_rewritten": int(meta.get("medptq.deconv_rewritten", 0)),
            "deconv_skipped": meta.get("medptq.deconv_skipped", ""),
            "onnxruntime": _fidelity(ref, _ort(path, x)),
            "openvino": _fidelity(ref_ov, engine(torch.from_numpy(x)).numpy()),
            "openvino_vs_int8_fp32": None,
            "openvino_up_layers": _upsampling_precisions(engine),
            "openvino_model": engine.describe().get("int8_model", ""),
        }
    base = engines["int8+fp32"](torch.from_numpy(x)).numpy()
    for name, engine in engines.items():
        rows[name]["openvino_vs_int8_fp32"] = None if name == "int8+fp32" else round(
            sqnr_db(base, engine(torch.from_numpy(x)).numpy()), 2)
    print(f"[{label}] OpenVINO latency: {rounds} rounds, variants interleaved, {threads} thread(s)", flush=True)
    one = torch.from_numpy(x[:1])
    times: dict[str, list[float]] = {n: [] for n in [*files, "fp32"]}
    cpu: dict[str, list[float]] = {n: [] for n in times}
    runners = {name: OpenVinoEngine(path, precision="int8", threads=threads) for name, path in files.items()}
    runners["fp32"] = OpenVinoEngine(fp32, precision="fp32", threads=threads)
    for r in runners.values():
        r(one)  # warm-up (compile)
        r(one)
    order = list(runners)
    for k in range(rounds):
        for name in order[k % len(order):] + order[:k % len(order)]:  # rotate who goes first
            t0, c0 = time.perf_counter(), time.process_time()
            runners[name](one)
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)  # CPU seconds of this process (all its threads)
    for name in times:
        target = rows.setdefault(name, {}) if name != "fp32" else rows.setdefault("fp32", {"file": str(fp32)})
        target["openvino_ms_median"] = round(1000 * statistics.median(times[name]), 1)
        target["openvino_ms_min"] = round(1000 * min(times[name]), 1)
        target["openvino_cpu_ms_median"] = round(1000 * statistics.median(cpu[name]), 1)
        target["openvino_ms_all"] = [round(1000 * t, 1) for t in times[name]]
    return rows


def _nnunet(work: Path, calib_patches: int, seed: int) -> tuple[Path, Path, tuple[int, ...], dict]:
    from medptq_monai.networks.nnunet import network_from_plans

    bundle = ROOT / "bundles/nnunet_int8"
    plans = json.loads((bundle / "configs/plans.json").read_text())
    meta = json.loads((bundle / "configs/metadata.json").read_text())
    conf = plans["configurations"]["3d_small"]
    roi = tuple(int(r) for r in conf["patch_size"])
    props = plans["foreground_intensity_properties_per_channel"]["0"]
    norm = (props["percentile_00_5"], props["percentile_99_5"], props["mean"], props["std"])
    spacing = conf.get("spacing", [3.0, 2.0, 2.0])  # nnU-Net (z, y, x) -> RAS (x, y, z)
    pixdim = (float(spacing[2]), float(spacing[1]), float(spacing[0]))
    net = network_from_plans(plans, "3d_small", 1, int(meta["network_data_format"]["outputs"]["pred"]["num_channels"]))
    fp32 = work / "nnunet_small.onnx"
    export_fp32(net, fp32, 1, roi, checkpoint=bundle / "models/small/model.pt")
    calib = _volume(CT / "calibration/slab_ct_other_patient.nii.gz", pixdim, None, norm)
    int8 = work / "nnunet_small_int8.onnx"
    options = QuantizeOptions(calibrator=DEFAULT_CALIBRATOR, seed=seed)
    quantize_onnx(fp32, int8, sample_patches([calib], PatchPlan(roi_size=roi, num_patches=calib_patches, seed=seed)),
                  options)
    setup = {"checkpoint": str(bundle / "models/small/model.pt"), "configuration": "3d_small", "roi": list(roi),
             "pixdim_ras": list(pixdim), "normalization": "CTNormalization (plans' foreground percentiles, mean, std)",
             "calibrator": options.calibrator, "calibration_patches": calib_patches,
             "calibration_volume": "tests/data/totalseg_ct/calibration/slab_ct_other_patient.nii.gz"}
    return fp32, int8, roi, {"setup": setup, "norm": norm, "pixdim": pixdim}


def _markdown(report: dict) -> str:
    lines = ["# TensorRT variants of the INT8 file, measured on the CPU engines", "",
             "TensorRT has not run on real hardware in this project (no TensorRT, no GPU here): the figures below "
             "are ONNX Runtime / OpenVINO CPU figures for files meant for TensorRT. INT8+FP32 stays the default.", "",
             machine_line(report["machine"]), "",
             f"Load: this machine's {report['machine']['cpu_count']} logical CPUs are shared with other jobs; load "
             f"average {report['machine']['load_average']} at the start and {report['load_average_end']} at the end. "
             f"Latencies (batch 1, one patch, OpenVINO with {report['threads']} inference thread(s) so that the "
             f"variants do not fight the other jobs for both cores) are medians and minima of {report['rounds']} "
             "interleaved rounds (variants rotated each round) and carry that load; CPU ms is the process's CPU "
             "time per call.", ""]
    for label, block in report["models"].items():
        lines += [f"## {label}", "", block["note"], "",
                  "| variant | MB | TRT check issues | deconvs rewritten | ORT SQNR dB | ORT argmax agree | OV SQNR dB | "
                  "OV argmax agree | OV mean Dice vs FP32 | OV SQNR vs INT8+FP32 dB | OV conv/deconv runtime precisions | "
                  "OV ms/patch median (min) | OV CPU ms/patch median |", "|" + "---|" * 13]
        for name, r in block["variants"].items():
            if name == "fp32":
                continue
            lines.append(
                f"| {name} | {r['bytes'] / 1e6:.2f} | {r['tensorrt_check_issues']} | {r['deconv_rewritten']} | "
                f"{r['onnxruntime']['sqnr_db']} | {r['onnxruntime']['argmax_agreement']} | {r['openvino']['sqnr_db']} | "
                f"{r['openvino']['argmax_agreement']} | {r['openvino']['mean_dice_vs_fp32']} | "
                f"{r['openvino_vs_int8_fp32'] if r['openvino_vs_int8_fp32'] is not None else '—'} | "
                f"{', '.join(f'{k}: {v}' for k, v in r['openvino_up_layers'].items())} | {r['openvino_ms_median']} "
                f"({r['openvino_ms_min']}) | {r['openvino_cpu_ms_median']} |")
        fp = block["variants"]["fp32"]
        lines += ["", f"OpenVINO FP32 ONNX, same rounds: {fp['openvino_ms_median']} ms/patch median "
                      f"({fp['openvino_ms_min']} min), {fp['openvino_cpu_ms_median']} CPU ms median.", ""]
        skipped = next((r["deconv_skipped"] for r in block["variants"].values() if r.get("deconv_skipped")), "")
        if skipped:
            lines += [f"ConvTranspose left alone by the rewrite: {skipped}", ""]
    lines += ["SQNR: logits vs the FP32 ONNX on the same engine (ONNX Runtime CPU; OpenVINO CPU at f32 inference "
              "precision). ONNX Runtime runs the float16 remainder with its float16 kernels where it has them and "
              "float32 kernels between casts it inserts; OpenVINO reads the float16 graph and computes it in f32, so "
              "its fp16 rows show the rounding of constants and scales, not of FP16 arithmetic. Neither is TensorRT's "
              "FP16 arithmetic: a GPU measurement decides whether the FP16 remainder becomes the default.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--unet_fp32", default=str(ROOT / "bundles/unet_int8/models/model.onnx"))
    parser.add_argument("--unet_int8", default=str(ROOT / "bundles/unet_int8/models/model_int8.onnx"))
    parser.add_argument("--eval_patches", type=int, default=4)
    parser.add_argument("--calib_patches", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="OpenVINO threads for the latency rounds")
    parser.add_argument("--out", default=str(ROOT / "reports/trt_variants"))
    args = parser.parse_args(argv)
    for p in (args.unet_fp32, args.unet_int8):
        if not Path(p).is_file():
            raise SystemExit(f"trt_variants: {p} not found: run `python -m medptq_monai.cli demo` first")
    machine = machine_info()
    report: dict = {"machine": machine, "rounds": args.rounds, "threads": args.threads, "eval_patches": args.eval_patches,
                    "models": {}}
    eval_ct = CT / "images/abdomen_ct.nii.gz"
    with tempfile.TemporaryDirectory(prefix="medptq-trt-variants-") as tmp:
        work = Path(tmp)
        # demo U-Net: its bundle's preprocessing (pixdim 1.5 x 1.5 x 2, HU window -175..250)
        unet_fp32, unet_int8 = Path(args.unet_fp32), Path(args.unet_int8)
        dims = onnx.load(str(unet_fp32), load_external_data=False).graph.input[0].type.tensor_type.shape.dim
        roi = tuple(int(d.dim_value) for d in dims[2:])
        x = _patches(_volume(eval_ct, (1.5, 1.5, 2.0), (-175.0, 250.0), None), roi, args.eval_patches, args.seed + 1)
        files = _variants(unet_fp32, unet_int8, work)
        report["models"]["demo U-Net (bundles/unet_int8, roi 96³)"] = {
            "note": "MONAI UNet: its four up-convolutions are ConvTranspose3d kernel 3, stride 2, padding 1, output "
                    "padding 1, so the rewrite does not apply (reported, file otherwise unchanged): the two rewrite "
                    "rows run the same graphs as the rows above them, so their latency differences are the timing "
                    "noise under this load. INT8 file: the demo's (`medptq demo`), its calibration.",
            "fp32": str(unet_fp32), "int8": str(unet_int8),
            "variants": _measure("unet", unet_fp32, files, x, args.rounds, args.threads)}
        # small nnU-Net: ConvTranspose3d kernel 2 stride 2 in the decoder
        fp32, int8, roi, info = _nnunet(work, args.calib_patches, args.seed)
        x = _patches(_volume(eval_ct, info["pixdim"], None, info["norm"]), roi, args.eval_patches, args.seed + 1)
        files = _variants(fp32, int8, work)
        report["models"][f"small nnU-Net (bundles/nnunet_int8, 3d_small, roi {roi[0]}³)"] = {
            "note": "PlainConvUNet 8-16-32-64, InstanceNorm + LeakyReLU; its three decoder up-convolutions are "
                    "ConvTranspose3d kernel 2 stride 2. Exported from the bundle's small checkpoint and calibrated here "
                    f"({info['setup']['calibrator']}, {args.calib_patches} patches of the calibration CT).",
            "setup": info["setup"], "variants": _measure("nnunet", fp32, files, x, args.rounds, args.threads)}
        report = relative_paths(report, work)  # variant files lived in a temporary folder: their names only
    report["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    report = relative_paths(report, ROOT)
    out = Path(args.out)
    write_text_atomic(out.with_suffix(".json"), json.dumps(report, indent=2) + "\n")
    write_text_atomic(out.with_suffix(".md"), _markdown(report))
    print(_markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
