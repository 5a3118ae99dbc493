"""Streaming activation calibration on top of ONNX Runtime's calibrators.

ONNX Runtime's calibrators (``onnxruntime.quantization.calibrate``) run an augmented graph
that exposes the tensors to calibrate, then reduce them to min/max or histograms. Fed all
patches at once they keep every intermediate tensor of every patch in memory (ONNX
Runtime's MinMax calibrator was killed at 24 GiB on SwinUNETR). Here they are fed one patch
per ``collect_data`` call, so memory is bounded by one patch's activations whatever the
patch count: MinMax merges ranges per call and the histogram collector merges histograms.

The histogram calibrators expose every calibrated tensor as a graph output, so one patch
costs the sum of those tensors (VISTA3D at 128³: 48 tensors, 12 GiB peak). Above
``max_pass_bytes`` the tensors are split into groups calibrated in separate passes over the
same patches: memory is bounded by one group, time grows with the number of passes. MinMax
exposes only per-tensor reductions and always runs in one pass.

Calibrators: ``max`` (MinMax, symmetric), ``entropy`` (KL divergence, TensorRT's method),
``percentile`` (``percentile`` of |x|) and ``mse`` (the clipping threshold minimising the
int8 quantization MSE over the |x| histogram; ONNX Runtime has no MSE method, so only this
threshold search is written here, on ONNX Runtime's histograms).
"""

from __future__ import annotations

import contextlib
import io
import itertools
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod
from onnxruntime.quantization.calibrate import (
    EntropyCalibrater,
    MinMaxCalibrater,
    PercentileCalibrater,
    TensorData,
    TensorsData,
)

from ..errors import CalibrationError, UnknownNameError

HISTOGRAM_BINS = 2048
INT8_LEVELS = 127
MAX_PASS_BYTES = 1024**3


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
    """Return ``name`` if it is a registered calibrator, else raise ``UnknownNameError`` listing them."""
    if name not in CALIBRATORS:
        raise UnknownNameError(f"unknown calibrator {name!r}; registered calibrators: {', '.join(CALIBRATORS)}")
    return name


def _make_calibrator(name: str, model_path: Path, augmented: Path, wanted: set[str], percentile: float):
    spec = CALIBRATORS[check_calibrator(name)]
    common = {"op_types_to_calibrate": None, "augmented_model_path": str(augmented), "symmetric": True}
    calib = _restricted(spec.ort_class)(str(model_path), **common, **spec.options(percentile))
    calib.wanted = set(wanted)
    calib.augment_graph()
    calib.create_inference_session()
    calib.model = None  # the loaded ModelProto (weights included) is not needed once the session exists
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


@dataclass(frozen=True)
class CalibratorSpec:
    """A registered calibrator: the ONNX Runtime calibrator class that collects statistics, its extra
    constructor arguments (given the percentile option), and how ranges are read from it.

    ``histogram`` calibrators expose whole tensors (calibrated in groups above ``max_pass_bytes``);
    ``ranges`` None means ONNX Runtime's own ``compute_data``.
    """

    name: str
    ort_class: type
    options: Callable[[float], dict] = lambda _percentile: {}
    ranges: Callable[[object], TensorsData] | None = None
    histogram: bool = True
    uses_percentile: bool = False


CALIBRATORS: dict[str, CalibratorSpec] = {}


def register_calibrator(spec: CalibratorSpec) -> CalibratorSpec:
    """Add ``spec`` to the registry (a name registered twice is an error)."""
    if spec.name in CALIBRATORS:
        raise ValueError(f"calibrator name {spec.name!r} is already taken")
    CALIBRATORS[spec.name] = spec
    return spec


register_calibrator(CalibratorSpec("max", MinMaxCalibrater, histogram=False))
register_calibrator(CalibratorSpec(
    "entropy", EntropyCalibrater, lambda _p: {"num_bins": HISTOGRAM_BINS, "num_quantized_bins": INT8_LEVELS + 1}))
register_calibrator(CalibratorSpec(
    "percentile", PercentileCalibrater, lambda p: {"num_bins": HISTOGRAM_BINS, "percentile": p}, uses_percentile=True))
register_calibrator(CalibratorSpec(  # the threshold search over PercentileCalibrater's |x| histograms
    "mse", PercentileCalibrater, lambda p: {"num_bins": HISTOGRAM_BINS, "percentile": p}, ranges=_mse_ranges))
# the default everywhere (library, bundles, CLI): measured best on the U-Net demo (reports/calibrators.md)
DEFAULT_CALIBRATOR = "mse"


def activation_bytes(model_path: str | os.PathLike, tensors: set[str], batch: int) -> dict[str, int]:
    """Bytes of each of ``tensors`` for one patch batch, from the (shape-inferred) model's value_info.

    The batch axis counts as ``batch``; a tensor whose shape is unknown counts as the largest known one.
    """
    model = onnx.load(str(model_path), load_external_data=False)
    infos = [*model.graph.input, *model.graph.value_info, *model.graph.output]
    sizes: dict[str, int] = {}
    for info in infos:
        if info.name not in tensors:
            continue
        t = info.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
        if not dims or any(d is None for d in dims[1:]):
            continue
        itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)).itemsize
        sizes[info.name] = int(np.prod([batch if d is None else d for d in dims])) * itemsize
    largest = max(sizes.values(), default=0)
    return {name: sizes.get(name, largest) for name in tensors}


def tensor_groups(sizes: dict[str, int], max_bytes: int) -> list[set[str]]:
    """Split tensors into as few groups of at most ``max_bytes`` as first-fit decreasing finds
    (a tensor larger than ``max_bytes`` gets a group of its own); deterministic order."""
    groups: list[tuple[int, set[str]]] = []
    for name, size in sorted(sizes.items(), key=lambda kv: (-kv[1], kv[0])):
        for i, (used, members) in enumerate(groups):
            if used + size <= max_bytes:
                members.add(name)
                groups[i] = (used + size, members)
                break
        else:
            groups.append((size, {name}))
    return [members for _, members in groups]


def _one_pass(
    model_path: Path, input_name: str, patches: Iterable[np.ndarray], calibrator: str, tensors: set[str],
    augmented: Path, percentile: float, on_patch: Callable[[int], None] | None,
) -> tuple[TensorsData, int, float]:
    """Stream ``patches`` once, calibrating ``tensors``: (ranges, patch count, input max |x|)."""
    calib = _make_calibrator(calibrator, model_path, augmented, tensors, percentile)
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
    reduce = CALIBRATORS[calibrator].ranges
    with contextlib.redirect_stdout(quiet):
        ranges = reduce(calib) if reduce is not None else calib.compute_data()
    return ranges, count, input_amax


def collect_ranges(
    model_path: str | os.PathLike,
    input_name: str,
    patches: Iterable[np.ndarray],
    calibrator: str,
    tensors: set[str],
    workdir: str | os.PathLike,
    percentile: float = 99.99,
    on_patch: Callable[[int], None] | None = None,
    max_pass_bytes: int = MAX_PASS_BYTES,
) -> tuple[TensorsData, int]:
    """Stream ``patches`` through the FP32 model and return (activation ranges, patch count).

    ``tensors`` are the activation tensors to calibrate. Histogram calibrators whose tensors add up
    to more than ``max_pass_bytes`` per patch calibrate them in groups over several passes (the
    patches are then held in memory). Raises ``CalibrationError`` when no patch arrives or a patch
    does not match the first one's shape.
    """
    spec = CALIBRATORS[check_calibrator(calibrator)]
    if spec.uses_percentile and not 0.0 < percentile <= 100.0:
        raise CalibrationError(f"percentile must be in (0, 100], got {percentile}")
    if not tensors:
        raise CalibrationError("the model has no tensors to calibrate (no quantizable op found)")
    if max_pass_bytes <= 0:
        raise CalibrationError(f"max_pass_bytes must be positive, got {max_pass_bytes}")
    model_path, work = Path(model_path), Path(workdir)
    groups = [set(tensors)]
    if spec.histogram:  # MinMax exposes only per-tensor reductions: one pass always fits
        iterator = iter(patches)
        first = next(iterator, None)
        if first is not None:
            groups = tensor_groups(activation_bytes(model_path, tensors, int(np.shape(first)[0])), max_pass_bytes)
            patches = itertools.chain([first], iterator)
            if len(groups) > 1:
                patches = list(patches)  # every pass needs the same patches
    merged: dict[str, TensorData] = {}
    count, input_amax, method = 0, 0.0, None
    for i, group in enumerate(groups):
        augmented = work / f"augmented{i}.onnx"
        ranges, count, input_amax = _one_pass(
            model_path, input_name, patches, calibrator, group, augmented, percentile, on_patch if i == 0 else None
        )
        method = ranges.calibration_method
        merged.update(ranges.items())
        augmented.unlink(missing_ok=True)
    if input_name in tensors:
        # The model input is the preprocessed image, whose range the bundle fixes (e.g. a clipped
        # HU window). Histogram calibrators can clip it hard (entropy picked 1/8 of [0, 1] on CT
        # with much air); clipping the input is never wanted, so it always gets its full range.
        amax = np.float32(input_amax or 1.0)
        merged[input_name] = TensorData(lowest=np.array(-amax, np.float32), highest=np.array(amax, np.float32))
    missing = tensors - set(merged)
    if missing:
        raise CalibrationError(f"calibration produced no range for {sorted(missing)[:5]}")
    return TensorsData(method, merged), count
