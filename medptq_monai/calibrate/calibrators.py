"""Streaming activation calibration on top of ONNX Runtime's calibrators.

ONNX Runtime's calibrators (``onnxruntime.quantization.calibrate``) run an augmented graph
that exposes the tensors to calibrate, then reduce them to min/max or histograms. Fed all
patches at once they keep every intermediate tensor of every patch in memory (ONNX
Runtime's MinMax calibrator was killed at 24 GiB on SwinUNETR). Here they are fed one patch
per ``collect_data`` call, so memory is bounded by one patch's activations whatever the
patch count: MinMax merges ranges per call and the histogram collector merges histograms.

Calibrators: ``max`` (MinMax, symmetric), ``entropy`` (KL divergence, TensorRT's method),
``percentile`` (``percentile`` of |x|) and ``mse`` (the clipping threshold minimising the
int8 quantization MSE over the |x| histogram; ONNX Runtime has no MSE method, so only this
threshold search is written here, on ONNX Runtime's histograms).
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod
from onnxruntime.quantization.calibrate import (
    EntropyCalibrater,
    MinMaxCalibrater,
    PercentileCalibrater,
    TensorData,
    TensorsData,
)

from ..errors import CalibrationError, UnknownNameError

CALIBRATORS = ("max", "entropy", "percentile", "mse")
HISTOGRAM_BINS = 2048
INT8_LEVELS = 127


class _OnePatch(CalibrationDataReader):
    def __init__(self, input_name: str, patch: np.ndarray) -> None:
        self._item: dict | None = {input_name: patch}

    def get_next(self) -> dict | None:
        item, self._item = self._item, None
        return item


def _restricted(cls: type) -> type:
    """An ONNX Runtime calibrator class that exposes only the tensors in ``self.wanted``.

    By default ONNX Runtime also exposes the *outputs* of every calibrated node; only the
    inputs of quantized nodes get Q/DQ here, so collecting the rest would waste memory.
    """

    def select_tensors_to_calibrate(self, model):
        tensors, value_infos = cls.select_tensors_to_calibrate(self, model)
        return tensors & self.wanted, value_infos

    return type(f"Bounded{cls.__name__}", (cls,), {"select_tensors_to_calibrate": select_tensors_to_calibrate})


def check_calibrator(name: str) -> str:
    """Return ``name`` if it is a known calibrator, else raise ``UnknownNameError``."""
    if name not in CALIBRATORS:
        raise UnknownNameError(f"unknown calibrator {name!r}; choose one of {', '.join(CALIBRATORS)}")
    return name


def _make_calibrator(name: str, model_path: Path, augmented: Path, wanted: set[str], percentile: float):
    common = {"op_types_to_calibrate": None, "augmented_model_path": str(augmented), "symmetric": True}
    if name == "max":
        calib = _restricted(MinMaxCalibrater)(str(model_path), **common)
    elif name == "entropy":
        calib = _restricted(EntropyCalibrater)(
            str(model_path), **common, num_bins=HISTOGRAM_BINS, num_quantized_bins=INT8_LEVELS + 1
        )
    else:  # percentile, and mse (which reads the same |x| histograms)
        calib = _restricted(PercentileCalibrater)(
            str(model_path), **common, num_bins=HISTOGRAM_BINS, percentile=percentile
        )
    calib.wanted = set(wanted)
    calib.augment_graph()
    calib.create_inference_session()
    return calib


def mse_threshold(hist: np.ndarray, edges: np.ndarray, levels: int = INT8_LEVELS, candidates: int = 512) -> float:
    """Clipping threshold ``t`` over an |x| histogram minimising the symmetric int8 quantization MSE.

    Each bin is represented by its centre; for a candidate ``t`` the error of a value ``c`` is
    ``(c - round(c / s) * s)^2`` with ``s = t / levels`` when ``c <= t``, and ``(c - t)^2`` when clipped.
    """
    hist = np.asarray(hist, dtype=np.float64)
    centres = (np.asarray(edges[:-1], np.float64) + np.asarray(edges[1:], np.float64)) / 2.0
    if hist.sum() == 0 or centres[-1] <= 0:
        return float(edges[-1])
    nonzero = np.nonzero(hist)[0]
    top = float(edges[nonzero[-1] + 1])
    grid = np.linspace(top / candidates, top, candidates)
    best_t, best_err = top, np.inf
    for t in grid:
        step = t / levels
        quant = np.clip(np.round(centres / step), 0, levels) * step
        err = float(np.dot(hist, (centres - quant) ** 2))
        if err < best_err:
            best_t, best_err = float(t), err
    return best_t


def _mse_ranges(calib) -> TensorsData:
    ranges = {}
    for tensor, (hist, edges, *_rest) in calib.collector.histogram_dict.items():
        t = np.float32(mse_threshold(hist, edges))
        ranges[tensor] = TensorData(lowest=np.array(-t, dtype=np.float32), highest=np.array(t, dtype=np.float32))
    return TensorsData(CalibrationMethod.Percentile, ranges)


def collect_ranges(
    model_path: str | os.PathLike,
    input_name: str,
    patches: Iterable[np.ndarray],
    calibrator: str,
    tensors: set[str],
    workdir: str | os.PathLike,
    percentile: float = 99.99,
    on_patch: Callable[[int], None] | None = None,
) -> tuple[TensorsData, int]:
    """Stream ``patches`` through the FP32 model and return (activation ranges, patch count).

    ``tensors`` are the activation tensors to calibrate. Raises ``CalibrationError`` when no
    patch arrives or a patch does not match the first one's shape.
    """
    check_calibrator(calibrator)
    if calibrator in ("percentile",) and not 0.0 < percentile <= 100.0:
        raise CalibrationError(f"percentile must be in (0, 100], got {percentile}")
    if not tensors:
        raise CalibrationError("the model has no tensors to calibrate (no quantizable op found)")
    augmented = Path(workdir) / "augmented.onnx"
    calib = _make_calibrator(calibrator, Path(model_path), augmented, tensors, percentile)
    count, shape, input_amax = 0, None, 0.0
    quiet = io.StringIO()
    for patch in patches:
        patch = np.ascontiguousarray(patch, dtype=np.float32)
        input_amax = max(input_amax, float(np.abs(patch).max()))
        if shape is None:
            shape = patch.shape
        elif patch.shape != shape:
            raise CalibrationError(f"calibration patch {count} has shape {patch.shape}, expected {shape}")
        with contextlib.redirect_stdout(quiet):
            calib.collect_data(_OnePatch(input_name, patch))
        count += 1
        if on_patch is not None:
            on_patch(count)
    if count == 0:
        raise CalibrationError("no calibration data: zero patches were produced (refusing to calibrate on nothing)")
    with contextlib.redirect_stdout(quiet):
        ranges = _mse_ranges(calib) if calibrator == "mse" else calib.compute_data()
    if input_name in tensors:
        # The model input is the preprocessed image, whose range the bundle fixes (e.g. a clipped
        # HU window). Histogram calibrators can clip it hard (entropy picked 1/8 of [0, 1] on CT
        # with much air); clipping the input is never wanted, so it always gets its full range.
        amax = np.float32(input_amax or 1.0)
        ranges[input_name] = TensorData(lowest=np.array(-amax, np.float32), highest=np.array(amax, np.float32))
    missing = tensors - set(ranges.keys())
    if missing:
        raise CalibrationError(f"calibration produced no range for {sorted(missing)[:5]}")
    return ranges, count
