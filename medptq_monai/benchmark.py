"""One bundle in depth (``medptq bench_volume``): torch FP32 eager vs ONNX Runtime / OpenVINO / TensorRT
FP32 and INT8, in one process. (``medptq bench``, all bundles per patch, is ``benchmark_suite``.)

For each row (engine, precision, device): per-patch latency on a real CT patch (median, p95),
MONAI ``SlidingWindowInferer`` whole-volume wall time, Dice vs the remapped labels and vs the
torch FP32 prediction, and peak RSS. Writes ``volume_benchmark.json``, ``.md`` and
``.png`` (atomically) to ``out_dir``.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .bundle.runner import bundle_parser
from .engines import create_engine, engine_names, engine_spec
from .engines.base import Engine
from .engines.tensorrt_engine import tensorrt_available
from .errors import CalibrationError, InputImageError, ModelFileError, UnknownNameError
from .fileio import atomic_path, relative_paths, write_text_atomic
from .machine import PeakRSS, machine_info, machine_line
from .metrics import dice_per_class, mean_dice, sqnr_db

logger = logging.getLogger(__name__)

SCHEMA = "medptq-benchmark-v1"
BENCH_ENGINES = engine_names(include_auto=False)
MIB = 1 << 20


@dataclass(frozen=True)
class RowSpec:
    """One benchmark row: an engine at a precision on a device."""

    engine: str
    precision: str
    label: str
    device: str = "cpu"


def registry_rows(device: str) -> tuple[RowSpec, ...]:
    """One row per registered engine and precision that runs on ``device`` (registry order)."""
    rows = []
    for name in BENCH_ENGINES:
        spec = engine_spec(name)
        if device not in spec.devices:
            continue
        for precision in spec.precisions:
            label = spec.label if len(spec.precisions) == 1 else f"{spec.label} {precision.upper()}"
            if device == "cuda" and "cpu" in spec.devices:
                label += " (CUDA)"
            rows.append(RowSpec(name, precision, label, device))
    return tuple(rows)


CPU_ROWS = registry_rows("cpu")
GPU_ROWS = registry_rows("cuda")


# ---- inputs -----------------------------------------------------------------------------------------


def parse_engines(engines: str | Sequence[str] | None) -> tuple[str, ...]:
    """``"openvino,torch"`` (or a list/tuple, as fire passes it) → names; ``None`` → all engines."""
    if engines is None or engines == "":
        return BENCH_ENGINES
    parts = engines.split(",") if isinstance(engines, str) else [str(e) for e in engines]
    names = tuple(dict.fromkeys(p.strip() for p in parts if p.strip()))
    unknown = [n for n in names if n not in BENCH_ENGINES]
    if unknown or not names:
        raise UnknownNameError(
            f"unknown benchmark engine(s) {unknown or engines!r}; registered engines: {', '.join(BENCH_ENGINES)}"
        )
    return names


def select_rows(names: Sequence[str]) -> list[RowSpec]:
    """The rows for ``names``: CPU rows, plus CUDA rows when torch sees a GPU (TensorRT rows always listed)."""
    gpu_rows = [r for r in GPU_ROWS if r.engine == "tensorrt" or torch.cuda.is_available()]
    return [r for r in (*CPU_ROWS, *gpu_rows) if r.engine in names]


def _plain(x: Any) -> torch.Tensor:
    """A plain float tensor (MetaTensor stripped)."""
    return x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x)


def cut_patch(image: torch.Tensor, label: np.ndarray, roi: Sequence[int]) -> torch.Tensor:
    """A ``[1, C, *roi]`` patch of ``image`` ``[C, D, H, W]`` centred on the label foreground
    (zero-padded where the volume is smaller than the roi)."""
    from monai.transforms import SpatialPad

    fg = np.argwhere(label > 0)
    center = fg.mean(axis=0) if len(fg) else np.asarray(label.shape) / 2.0
    shape = image.shape[1:]
    starts = [int(np.clip(round(c - r / 2), 0, max(s - r, 0))) for c, r, s in zip(center, roi, shape, strict=True)]
    box = (slice(None), *(slice(st, st + r) for st, r in zip(starts, roi, strict=True)))
    return _plain(SpatialPad(list(roi))(image[box]))[None].float().contiguous()


def window_batch_sizes(shape: Sequence[int], roi: Sequence[int], overlap: Any, sw_batch_size: int) -> list[int]:
    """Batch sizes MONAI's sliding window will feed the network for a volume of ``shape``
    (full ``sw_batch_size`` batches and the remainder); used to warm up shape-specialised engines."""
    size = [max(int(s), int(r)) for s, r in zip(shape, roi, strict=True)]
    overlaps = list(overlap) if isinstance(overlap, Sequence) else [float(overlap)] * len(roi)
    try:  # _get_scan_interval is MONAI-private: fall back to full batches only if it moves
        from monai.data.utils import dense_patch_slices
        from monai.inferers.utils import _get_scan_interval

        n = len(dense_patch_slices(size, list(roi), _get_scan_interval(size, list(roi), len(roi), overlaps)))
    except Exception:
        return [int(sw_batch_size)]
    return sorted({min(sw_batch_size, n), n % sw_batch_size} - {0})


class _EngineModule(torch.nn.Module):
    """An ``Engine`` as an ``nn.Module`` for ``SlidingWindowInferer``."""

    def __init__(self, engine: Engine) -> None:
        super().__init__()
        self.engine = engine

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.engine(x).to(x.device)


MAX_REPEATS = 9  # time_calls: the most timed calls that ``min_seconds`` adds up to


def time_interleaved(fns: Sequence[Callable[[], Any]], warmup: int, repeats: int, device: str = "cpu",
                     min_seconds: float = 0.0, max_repeats: int = MAX_REPEATS) -> list[tuple[list[float], Any]]:
    """Time ``fns`` in rounds: ``warmup`` untimed calls of each, then rounds of one timed call of each (perf_counter,
    CUDA synchronised; every other round in reverse order, so neither is always first) until each has ``repeats``
    calls and, up to ``max_repeats``, its calls total at least ``min_seconds``. Interleaved, a load that comes and
    goes on the machine falls on all of them alike: their ratio is what the rounds share. Returns each one's times
    in seconds and its last result."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for fn in fns:
        for _ in range(warmup):
            fn()
    sync()
    times: list[list[float]] = [[] for _ in fns]
    outs: list[Any] = [None] * len(fns)
    cap = max(max_repeats, repeats)

    def wanted(t: list[float]) -> bool:
        return len(t) < repeats or (sum(t) < min_seconds and len(t) < cap)

    while any(wanted(t) for t in times):
        order = range(len(fns)) if len(times[0]) % 2 == 0 else reversed(range(len(fns)))
        for i in order:
            start = time.perf_counter()
            outs[i] = fns[i]()
            sync()
            times[i].append(time.perf_counter() - start)
    return list(zip(times, outs))


def time_calls(fn: Callable[[], Any], warmup: int, repeats: int, device: str = "cpu", min_seconds: float = 0.0,
               max_repeats: int = MAX_REPEATS) -> tuple[list[float], Any]:
    """``warmup`` untimed then ``repeats`` timed calls of ``fn`` (perf_counter, CUDA synchronised), more (up to
    ``max_repeats``) while the timed calls total less than ``min_seconds``; returns the times in seconds and the
    last result."""
    return time_interleaved([fn], warmup, repeats, device, min_seconds, max_repeats)[0]


# ---- calibration ------------------------------------------------------------------------------------


def run_calibration(bundle: Path, images_dir: Path, num_patches: int | None = None,
                    overrides: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``medptq quantize`` on the bundle in a subprocess, sampling its RSS (with its children) every ~20 ms:
    ``calib_peak_bytes``. (``wait4``'s maxrss is not used: in a process that runs several calibrations it
    reported the largest child so far, not this one.) ``overrides`` are passed as ``--key value`` (e.g.
    ``models_dir``, ``checkpoint``). No held-back patches: the peak is calibration's."""
    cmd = [sys.executable, "-m", "medptq_monai.cli", "quantize", str(bundle), "--dataset_dir", str(images_dir),
           "--heldout_patches", "0", "--progress", "False"]
    if num_patches:
        cmd += ["--num_patches", str(int(num_patches))]
    for key, value in (overrides or {}).items():
        cmd += [f"--{key}", str(value)]
    logger.info("calibrating: %s", " ".join(cmd))
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        with PeakRSS(proc.pid) as mem:
            proc.wait()
        if proc.returncode != 0:
            log.seek(0)
            tail = log.read()[-4000:]
            raise CalibrationError(f"calibration failed (exit {proc.returncode}): {' '.join(cmd)}\n{tail}")
    return {
        "ran": True,
        "calib_peak_bytes": mem.peak,
        "seconds": time.perf_counter() - start,
        "num_patches": num_patches,
        "dataset_dir": str(images_dir),
        "command": cmd,
        "note": "peak RSS of the calibration subprocess and its children",
    }


# ---- rows -------------------------------------------------------------------------------------------


@dataclass
class _Case:
    """Everything the rows share: bundle objects, inputs and settings."""

    parser: Any
    bundle: Path
    patch: torch.Tensor
    volume: torch.Tensor
    label: np.ndarray
    num_classes: int
    in_channels: int
    warm_batches: list[int]
    repeats: int
    warmup: int
    volume_repeats: int
    threads: int | None


def build_engine(spec: RowSpec, case: _Case) -> Engine:
    """The row's engine via ``create_engine`` (``threads`` for the CPU runtimes when set)."""
    models = case.bundle / "models"
    model = models / ("model_int8.onnx" if spec.precision == "int8" else "model.onnx")
    return create_engine(
        spec.engine, model, spec.precision, spec.device,
        torch_network=case.parser.get_parsed_content("network_def", lazy=False) if spec.engine == "torch" else None,
        checkpoint=models / "model.pt", in_channels=case.in_channels, num_classes=case.num_classes,
        cache_dir=case.bundle / ".cache", threads=case.threads,
    )


def _row(spec: RowSpec, status: str = "ok", reason: str | None = None) -> dict[str, Any]:
    keys = ("patch_median_s", "patch_p95_s", "patch_times_s", "volume_s", "volume_times_s", "speedup_vs_torch_volume",
            "speedup_vs_torch_patch", "dice_vs_labels", "dice_per_class_vs_labels", "dice_vs_torch_fp32", "sqnr_db",
            "peak_rss_bytes", "rss_start_bytes", "baseline", "engine_info")
    return {"label": spec.label, "engine": spec.engine, "precision": spec.precision, "device": spec.device,
            "status": status, "reason": reason, **dict.fromkeys(keys)}


def run_row(spec: RowSpec, case: _Case) -> tuple[dict[str, Any], np.ndarray | None, np.ndarray | None]:
    """Measure one row; returns the row dict, its whole-volume argmax and its patch logits (``None``s if it failed)."""
    row = _row(spec)
    inferer = case.parser.get_parsed_content("inferer")
    patch, volume = case.patch.to(spec.device), case.volume.to(spec.device)
    mem = PeakRSS()
    try:
        with mem, torch.no_grad():
            engine = build_engine(spec, case)
            row["engine_info"] = engine.describe()
            patch_times, patch_out = time_calls(lambda: engine(patch), case.warmup, case.repeats, spec.device)
            patch_logits = _plain(patch_out).float().cpu().numpy()
            for batch in case.warm_batches:  # compile the sliding-window batch shapes before timing
                engine(patch.expand(batch, *patch.shape[1:]).contiguous())
            network = _EngineModule(engine)
            volume_times, logits = time_calls(lambda: inferer(volume, network), 0, case.volume_repeats, spec.device)
            pred = torch.argmax(_plain(logits), dim=1)[0].to("cpu", torch.uint8).numpy()
    except Exception as err:  # one broken engine must not lose the other rows
        logger.exception("benchmark row %s failed", spec.label)
        row.update(status="error", reason=f"{type(err).__name__}: {err}", peak_rss_bytes=mem.peak or None)
        return row, None, None
    finally:
        engine = network = logits = patch_out = None
        gc.collect()
    per_class = dice_per_class(pred, case.label, case.num_classes)
    row.update(
        patch_median_s=float(np.median(patch_times)), patch_p95_s=float(np.percentile(patch_times, 95)),
        patch_times_s=patch_times, volume_s=float(np.median(volume_times)), volume_times_s=volume_times,
        dice_vs_labels=mean_dice(per_class), dice_per_class_vs_labels={str(k): v for k, v in per_class.items()},
        peak_rss_bytes=mem.peak, rss_start_bytes=mem.start,
    )
    return row, pred, patch_logits


def compare_to_torch(row: dict[str, Any], pred: np.ndarray, logits: np.ndarray, base: dict[str, Any],
                     base_pred: np.ndarray, base_logits: np.ndarray, num_classes: int) -> None:
    """Add speedups (torch time / row time), Dice vs the torch FP32 argmax and the patch logits'
    SQNR vs torch FP32 (dB) to ``row``."""
    row["speedup_vs_torch_volume"] = base["volume_s"] / row["volume_s"]
    row["speedup_vs_torch_patch"] = base["patch_median_s"] / row["patch_median_s"]
    row["dice_vs_torch_fp32"] = mean_dice(dice_per_class(pred, base_pred, num_classes))
    row["sqnr_db"] = sqnr_db(base_logits, logits)
    row["baseline"] = base["label"]


# ---- reports ----------------------------------------------------------------------------------------


def _fmt(value: float | None, spec: str, scale: float = 1.0, suffix: str = "") -> str:
    return "—" if value is None else f"{value * scale:{spec}}{suffix}"


def render_markdown(report: dict[str, Any]) -> str:
    """The Markdown report: one table row per benchmark row, then sizes, calibration and machine."""
    s, m, sizes, cal = report["settings"], report["machine"], report["sizes"], report["calibration"]
    lines = [
        "# medptq-monai benchmark: one bundle, every engine, whole volume", "",
        f"Volume `{Path(s['volume_image']).name}` preprocessed to {s['volume_shape']}, roi {s['roi_size']}, "
        f"sw_batch_size {s['sw_batch_size']}, overlap {s['overlap']}, {s['blend_mode']} blending; per patch "
        f"(a roi patch of that volume centred on the labelled organs): batch 1, {s['warmup']} warm-up + "
        f"{s['repeats']} timed calls; whole volume: median of "
        f"{s['volume_repeats']} run(s). Speedups are vs the torch FP32 row on the same device.", "",
        "| engine | precision | patch median ms | p95 ms | volume s | speedup volume | speedup patch "
        "| Dice vs labels | Dice vs FP32 | SQNR dB | peak RSS MiB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    notes = []
    for r in report["rows"]:
        status = "" if r["status"] == "ok" else f" ({r['status']})"
        if status:
            notes.append(f"- {r['label']}: {r['status']} — {r['reason']}")
        lines.append(
            f"| {r['label']}{status} | {r['precision']} "
            f"| {_fmt(r['patch_median_s'], '.1f', 1e3)} | {_fmt(r['patch_p95_s'], '.1f', 1e3)} "
            f"| {_fmt(r['volume_s'], '.2f')} | {_fmt(r['speedup_vs_torch_volume'], '.2f', suffix='x')} "
            f"| {_fmt(r['speedup_vs_torch_patch'], '.2f', suffix='x')} | {_fmt(r['dice_vs_labels'], '.4f')} "
            f"| {_fmt(r['dice_vs_torch_fp32'], '.4f')} | {_fmt(r['sqnr_db'], '.1f')} "
            f"| {_fmt(r['peak_rss_bytes'], '.0f', 1 / MIB)} |"
        )
    calib = (f"{cal['calib_peak_bytes'] / MIB:.0f} MiB peak RSS, {cal['seconds']:.1f} s" if cal["ran"]
             else cal["note"])
    lines += [
        "", *notes, *([""] if notes else []),
        f"ONNX size: FP32 {_fmt(sizes['onnx_fp32_bytes'], ',.0f')} bytes, "
        f"INT8 {_fmt(sizes['onnx_int8_bytes'], ',.0f')} bytes "
        f"({_fmt(sizes['size_ratio'], '.2f', suffix='x')} smaller).", "",
        f"Calibration: {calib}.", "",
        machine_line(m), "",
        f"Command: `{' '.join(m['command'])}`", "",
    ]
    return "\n".join(lines)


def plot_report(report: dict[str, Any], path: Path) -> None:
    """Bar charts of per-patch median (ms) and whole-volume time (s) per row, written atomically (Agg)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = [r for r in report["rows"] if r["status"] == "ok"]
    labels = [r["label"] for r in rows]
    fig = Figure(figsize=(11, 0.5 * max(len(rows), 2) + 1.8))
    FigureCanvasAgg(fig)
    for ax, key, scale, title in zip(fig.subplots(1, 2), ("patch_median_s", "volume_s"), (1e3, 1.0),
                                     ("per patch, median (ms)", "whole volume, sliding window (s)"), strict=True):
        values = [r[key] * scale for r in rows]
        ax.barh(labels, values, color=["#888888" if r["engine"] == "torch" else "#3b7dd8" for r in rows])
        ax.invert_yaxis()
        ax.margins(x=0.15)
        ax.set_title(title)
        for y, v in enumerate(values):
            ax.text(v, y, f" {v:.3g}", va="center", fontsize=8)
    fig.axes[1].set_yticklabels([])
    fig.suptitle(f"medptq-monai benchmark — {report['machine']['summary']}", fontsize=9)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)


def write_reports(
    report: dict[str, Any],
    out_dir: str | os.PathLike,
    stem: str = "volume_benchmark",
    render: Callable[[dict[str, Any]], str] = render_markdown,
    plot: Callable[[dict[str, Any], Path], None] = plot_report,
) -> dict[str, Path]:
    """Write ``<stem>.json``, ``<stem>.md`` (``render``) and ``<stem>.png`` (``plot``) to ``out_dir`` atomically
    (their paths are recorded in ``report["files"]`` first); paths in them are relative to the working folder.
    The all-bundles suite passes its own renderers."""
    out = Path(out_dir).resolve()
    paths = {ext: out / f"{stem}.{ext}" for ext in ("json", "md", "png")}
    report["files"] = {ext: str(path) for ext, path in paths.items()}
    shown = relative_paths(report)  # paths relative to the working folder (the repository), never absolute
    write_text_atomic(paths["json"], json.dumps(shown, indent=2) + "\n")
    write_text_atomic(paths["md"], render(shown))
    plot(report, paths["png"])
    return paths


# ---- entry point ------------------------------------------------------------------------------------


def _load_case_volume(parser: Any, data_dir: Path, quick: bool) -> tuple[dict[str, str], torch.Tensor, np.ndarray]:
    from .bundle.paths import paired_datalist

    suffix = "_small" if quick else ""
    pair = paired_datalist(data_dir, f"images{suffix}", f"labels{suffix}")[0]
    data = parser.get_parsed_content("preprocessing")(dict(pair))
    return pair, _plain(data["image"]).float(), _plain(data["label"])[0].numpy()


def run_benchmark(
    bundle: str = "bundles/unet_int8",
    data_dir: str = "tests/data/totalseg_ct",
    out_dir: str = "reports",
    repeats: int = 10,
    warmup: int = 2,
    engines: str | Sequence[str] | None = None,
    quick: bool = False,
    calibrate: bool = False,
    threads: int | None = None,
    volume_repeats: int = 3,
    calib_patches: int | None = None,
) -> dict[str, Any]:
    """Benchmark every requested engine/precision on the bundle and the CT in ``data_dir``.

    ``data_dir`` holds ``images/`` + ``labels/`` (``images_small/`` + ``labels_small/`` with
    ``quick``, which also sets repeats=3, warmup=1, volume_repeats=1). ``engines``: comma-separated
    subset of torch, onnxruntime, openvino, tensorrt. The ONNX models are (re)made by a calibration
    subprocess (on ``<data_dir>/calibration`` when it exists, else on the benchmarked images) when
    ``calibrate`` or when ``models/model_int8.onnx`` is missing (``calib_patches`` overrides the
    bundle's patch count). ``threads`` sets torch / ONNX Runtime / OpenVINO threads.
    Returns the report written to ``out_dir/volume_benchmark.{json,md,png}``.
    """
    names = parse_engines(engines)
    root = Path(bundle).resolve()
    data = Path(data_dir).resolve()
    if not (root / "configs" / "inference.json").is_file():
        raise ModelFileError(f"not a bundle folder (no configs/inference.json): {root}")
    if not data.is_dir():
        raise InputImageError(f"data folder does not exist: {data}")
    checkpoint = root / "models" / "model.pt"
    if not checkpoint.is_file():
        raise ModelFileError(f"checkpoint not found: {checkpoint} (the torch row and calibration need it)")
    if quick:
        repeats, warmup, volume_repeats = 3, 1, 1
    repeats, warmup, volume_repeats = max(int(repeats), 1), max(int(warmup), 0), max(int(volume_repeats), 1)

    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        parser = bundle_parser(root, ["inference.json"], **{"inferer#progress": False})
        pair, image, label = _load_case_volume(parser, data, quick)
        models = root / "models"
        onnx_rows = any(n != "torch" for n in names)
        calibration: dict[str, Any] = {"ran": False, "calib_peak_bytes": None, "seconds": None,
                                        "note": "not run in this call: existing models/*.onnx were used"}
        if calibrate or (onnx_rows and not (models / "model_int8.onnx").is_file()):
            calib_dir = data / "calibration" if (data / "calibration").is_dir() else Path(pair["image"]).parent
            calibration = run_calibration(root, calib_dir, calib_patches)
        roi = [int(r) for r in parser.get_parsed_content("roi_size")]
        sw_batch, overlap = int(parser.get_parsed_content("sw_batch_size")), parser.get_parsed_content("overlap")
        case = _Case(
            parser=parser, bundle=root, patch=cut_patch(image, label, roi), volume=image[None].contiguous(),
            label=label, num_classes=int(parser.get_parsed_content("num_classes")),
            in_channels=int(parser.get_parsed_content("in_channels")),
            warm_batches=window_batch_sizes(image.shape[1:], roi, overlap, sw_batch),
            repeats=repeats, warmup=warmup, volume_repeats=volume_repeats, threads=threads,
        )
        trt_ok, trt_reason = tensorrt_available()
        rows: list[dict[str, Any]] = []
        baselines: dict[str, tuple[dict[str, Any], np.ndarray, np.ndarray]] = {}
        for spec in select_rows(names):
            if spec.engine == "tensorrt" and not trt_ok:
                rows.append(_row(spec, "skipped", trt_reason))
                continue
            logger.info("benchmark: %s", spec.label)
            row, pred, logits = run_row(spec, case)
            if pred is not None and spec.engine == "torch":
                baselines[spec.device] = (row, pred, logits)
            if pred is not None and spec.device in baselines:
                compare_to_torch(row, pred, logits, *baselines[spec.device], case.num_classes)
            rows.append(row)
        machine = machine_info()
    finally:
        torch.set_num_threads(previous_threads)

    fp32_bytes, int8_bytes = (p.stat().st_size if p.is_file() else None
                              for p in (models / "model.onnx", models / "model_int8.onnx"))
    report = {
        "schema": SCHEMA,
        "settings": {
            "bundle": str(root), "data_dir": str(data), "volume_image": pair["image"], "volume_label": pair["label"],
            "volume_shape": list(image.shape[1:]), "patch_shape": list(case.patch.shape), "roi_size": roi,
            "sw_batch_size": sw_batch, "overlap": overlap, "blend_mode": parser.get_parsed_content("blend_mode"),
            "num_classes": case.num_classes, "repeats": repeats, "warmup": warmup, "volume_repeats": volume_repeats,
            "quick": bool(quick), "threads": threads, "engines": list(names),
        },
        "machine": machine,
        "sizes": {
            "onnx_fp32_bytes": fp32_bytes, "onnx_int8_bytes": int8_bytes, "checkpoint_bytes": checkpoint.stat().st_size,
            "size_ratio": fp32_bytes / int8_bytes if fp32_bytes and int8_bytes else None,
        },
        "calibration": calibration,
        "rows": rows,
    }
    write_reports(report, out_dir)
    return report


__all__ = [
    "BENCH_ENGINES",
    "PeakRSS",
    "RowSpec",
    "dice_per_class",
    "machine_info",
    "mean_dice",
    "parse_engines",
    "render_markdown",
    "run_benchmark",
    "run_calibration",
    "write_reports",
]
