"""Accuracy-aware PTQ: return the most harmful layers to float until a Dice budget holds.

The activation ranges are calibrated once; every candidate model is the same Q/DQ rewrite with a
different set of nodes left in float (``write_qdq``), run with ONNX Runtime on seeded validation
patches that calibration never saw. The procedure, with N quantizable nodes:

1. all nodes INT8: if the Dice drop is within the budget, nothing goes back to float (1 evaluation);
2. harm of each node: the logits' SQNR gain when only that node is returned to float (1 + N short
   evaluations on a few validation patches; SQNR rather than Dice because it is continuous, so the order is
   stable on few patches);
3. the shortest prefix of that order that meets the budget, by bisection over at most
   ``max_float_fraction`` of the nodes (1 + ceil(log2(N * max_float_fraction)) evaluations); the
   drop is assumed to shrink as layers return to float, and every reported drop was measured.

So a 100-layer model needs 101 short evaluations (patches) and about 1 + 1 + 6 = 8 scored ones. The budget
is scored on whole validation volumes segmented by the bundle's own inferer (sliding window, blending) when
they are given, else on the patches. Every candidate (and the FP32 reference) runs on a CPU engine of the
registry, as the bundle will run it (``engine``; ``auto``: OpenVINO when installed, else ONNX Runtime), so
the drop recorded is the drop of that engine on this host's INT8 path (``cpu_isa``). When even the largest
allowed float set misses the budget, ``AccuracyBudgetError`` reports the best drop measured.

Metrics: ``dice_vs_fp32`` (the drop is 1 - Dice of the INT8 argmax against the FP32 argmax) or
``dice_vs_labels`` (FP32 Dice vs labels minus INT8 Dice vs labels). Dice is pooled over all validation
voxels, per foreground class present in the reference, then averaged over classes.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from ..engines import AUTO, Engine, create_engine, engine_spec, first_cpu_engine
from ..errors import CalibrationError, UnknownNameError
from ..export.onnx_model import save_onnx
from ..metrics import dice_per_class, mean_dice, sqnr_db

METRICS = ("dice_vs_fp32", "dice_vs_labels")


class AccuracyBudgetError(CalibrationError):
    """The budget cannot be met within the allowed float layers (the report says what was measured)."""


def check_budget(max_dice_drop: float, metric: str = "dice_vs_fp32") -> None:
    """Refuse a budget outside (0, 1) and an unknown metric."""
    if metric not in METRICS:
        raise UnknownNameError(f"unknown accuracy metric {metric!r}; choose one of {', '.join(METRICS)}")
    if isinstance(max_dice_drop, bool) or not isinstance(max_dice_drop, (int, float)) \
            or not 0.0 < float(max_dice_drop) < 1.0:
        raise CalibrationError(f"max_dice_drop must be a number strictly between 0 and 1, got {max_dice_drop!r}")


def check_evaluation_engine(name: str) -> str:
    """The CPU engine that will score the candidates (``auto``: the first installed CPU engine)."""
    if name == AUTO:
        return first_cpu_engine()
    spec = engine_spec(name)  # an unknown name lists the registered ones
    if "cpu" not in spec.devices or "int8" not in spec.precisions:
        raise UnknownNameError(f"accuracy control scores candidates on a CPU INT8 engine; {name!r} is not one "
                               "(choose auto, onnxruntime or openvino)")
    return name


@dataclass
class ValidationSet:
    """What the budget is measured on.

    ``images``: patches ``[1, C, *roi]``; they rank the layers, and measure the budget when there are no
    ``volumes``. ``volumes``: whole preprocessed volumes ``[C, D, H, W]``, segmented with ``inferer``
    (``inferer(x, network)`` on a ``[1, C, D, H, W]`` tensor, e.g. the bundle's own sliding-window inferer):
    then the budget is whole-volume Dice, as the bundle will segment. ``labels``: one ``[D, H, W]`` label per
    volume (or per patch without volumes), for ``dice_vs_labels``.
    """

    images: list[np.ndarray]
    labels: list[np.ndarray] | None = None
    volumes: list[np.ndarray] | None = None
    inferer: Callable[..., Any] | None = None

    @property
    def scored(self) -> list[np.ndarray]:
        """What the budget is measured on: the volumes when given, else the patches."""
        return self.volumes if self.volumes else self.images


@dataclass
class AccuracyControl:
    """A Dice budget and the validation data it is measured on (disjoint from calibration)."""

    max_dice_drop: float
    validation: ValidationSet
    num_classes: int
    metric: str = "dice_vs_fp32"
    max_float_fraction: float = 0.5
    engine: str = AUTO

    def __post_init__(self) -> None:
        check_budget(self.max_dice_drop, self.metric)
        check_evaluation_engine(self.engine)
        if not self.validation.images:
            raise CalibrationError("the validation set is empty: accuracy control needs validation patches")
        if self.validation.volumes and self.validation.inferer is None:
            raise CalibrationError("validation volumes need an inferer (e.g. the bundle's sliding-window inferer)")
        if self.metric == "dice_vs_labels":
            labels = self.validation.labels
            if labels is None or len(labels) != len(self.validation.scored):
                raise CalibrationError("metric dice_vs_labels needs a label for every validation image; the "
                                       "validation set has none (give a datalist with 'label' entries)")
            if not any(np.any(np.asarray(lab) > 0) for lab in labels):
                raise CalibrationError("the validation labels hold no foreground voxel: Dice vs labels is undefined")
        if not 0.0 <= self.max_float_fraction <= 1.0:
            raise CalibrationError(f"max_float_fraction must be in [0, 1], got {self.max_float_fraction}")


@dataclass
class AccuracyResult:
    """What accuracy control chose and measured."""

    float_nodes: list[str]
    dice_drop: float
    dice_drop_all_int8: float
    sqnr_db: float
    evaluations: int
    seconds: float
    max_dice_drop: float
    metric: str
    engine: str = ""
    isa: str = ""
    history: list[dict[str, Any]] = field(default_factory=list)

    def metadata(self) -> dict[str, str]:
        """``metadata_props`` entries for the INT8 file."""
        return {
            "medptq.accuracy.metric": self.metric,
            "medptq.accuracy.max_dice_drop": f"{self.max_dice_drop:g}",
            "medptq.accuracy.dice_drop": f"{self.dice_drop:.5f}",
            "medptq.accuracy.dice_drop_all_int8": f"{self.dice_drop_all_int8:.5f}",
            "medptq.accuracy.float_nodes": ",".join(self.float_nodes),
            "medptq.accuracy.evaluations": str(self.evaluations),
            "medptq.accuracy.engine": f"{self.engine} ({self.isa})",
        }

    def summary(self) -> dict[str, Any]:
        """A JSON-able summary (for the bundle's metadata and the command's report)."""
        return {"metric": self.metric, "max_dice_drop": self.max_dice_drop, "dice_drop": round(self.dice_drop, 5),
                "dice_drop_all_int8": round(self.dice_drop_all_int8, 5), "sqnr_db": round(self.sqnr_db, 2),
                "float_layers": list(self.float_nodes), "evaluations": self.evaluations,
                "seconds": round(self.seconds, 1), "engine": self.engine, "isa": self.isa}


def patch_logits(engine: Engine, patches: Sequence[np.ndarray]) -> np.ndarray:
    """Logits of ``patches`` as ``[classes, voxels]`` (patches concatenated)."""
    with torch.no_grad():
        out = np.concatenate([engine(torch.from_numpy(p)).float().cpu().numpy() for p in patches])
    return np.moveaxis(out, 1, 0).reshape(out.shape[1], -1)


def scored_logits(engine: Engine, validation: ValidationSet) -> np.ndarray:
    """``[classes, voxels]`` logits of what a Dice budget is scored on: ``validation``'s whole volumes through
    its inferer (volumes concatenated), or its patches when it has no volumes."""
    if not validation.volumes:
        return patch_logits(engine, validation.images)
    outs = []
    with torch.no_grad():
        for volume in validation.volumes:
            out = validation.inferer(torch.from_numpy(np.ascontiguousarray(volume, np.float32))[None], engine)
            out = out.as_tensor() if hasattr(out, "as_tensor") else torch.as_tensor(out)
            outs.append(out[0].float().cpu().numpy().reshape(out.shape[1], -1))
    return np.concatenate(outs, axis=1)


class _Evaluator:
    """Runs Q/DQ variants of one pre-processed model on a CPU engine and scores them on the validation set."""

    def __init__(self, control: AccuracyControl, pre: Path, work: Path,
                 write: Callable[[Sequence[str]], onnx.ModelProto]) -> None:
        self.control, self.work, self.write = control, work, write
        self.engine_name = check_evaluation_engine(control.engine)
        self.isa = ""
        self.count = 0
        reference = self._engine(pre, "fp32")
        self.rank_reference = patch_logits(reference, control.validation.images)
        self.reference = (scored_logits(reference, control.validation) if control.validation.volumes
                          else self.rank_reference)
        del reference
        self.reference_pred = self.reference.argmax(axis=0)
        labels = control.validation.labels
        self.labels = np.concatenate([np.asarray(lab).ravel() for lab in labels]) if labels is not None else None
        if control.metric == "dice_vs_fp32" and not np.any(self.reference_pred > 0):
            raise CalibrationError("the FP32 model predicts no foreground on the validation data: Dice vs FP32 "
                                   "is undefined (give validation data with the structures the model segments)")
        self.fp32_vs_labels = self._dice(self.reference_pred, self.labels) if self.labels is not None else None

    def _engine(self, model: Path | onnx.ModelProto, precision: str = "int8") -> Engine:
        """The evaluation engine loaded with ``model`` (a candidate is written to the work folder first)."""
        if isinstance(model, onnx.ModelProto):
            path = self.work / "candidate.onnx"
            save_onnx(model, path)
            model = path
        engine = create_engine(self.engine_name, model, precision, "cpu")
        if precision == "int8":
            self.isa = engine.describe().get("isa", "")
        return engine

    def _dice(self, pred: np.ndarray, ref: np.ndarray) -> float:
        return mean_dice(dice_per_class(pred, ref, self.control.num_classes)) or 0.0

    def sqnr(self, float_nodes: Sequence[str]) -> float:
        """SQNR (dB) of the logits on the ranking patches with ``float_nodes`` in float."""
        self.count += 1
        return sqnr_db(self.rank_reference, patch_logits(self._engine(self.write(float_nodes)),
                                                         self.control.validation.images))

    def __call__(self, float_nodes: Sequence[str]) -> tuple[float, float]:
        """(Dice drop, SQNR dB) on what the budget is scored on, with ``float_nodes`` kept in float."""
        self.count += 1
        logits = scored_logits(self._engine(self.write(float_nodes)), self.control.validation)
        pred = logits.argmax(axis=0)
        if self.control.metric == "dice_vs_fp32":
            drop = 1.0 - self._dice(pred, self.reference_pred)
        else:
            drop = float(self.fp32_vs_labels) - self._dice(pred, self.labels)
        return float(drop), sqnr_db(self.reference, logits)


def choose_float_nodes(
    control: AccuracyControl,
    pre: Path,
    chosen: Sequence[str],
    write_variant: Callable[[Sequence[str]], onnx.ModelProto],
) -> AccuracyResult:
    """The smallest harm-ordered set of ``chosen`` nodes to keep in float so the Dice drop meets the budget.

    ``write_variant(float_nodes)`` returns the Q/DQ model with ``float_nodes`` (a subset of ``chosen``) in
    float and the other ``chosen`` nodes quantized with the calibrated ranges. Deterministic: same patches, same choice.
    """
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="medptq-accuracy-") as work:
        return _choose(control, _Evaluator(control, pre, Path(work), write_variant), chosen, start)


def _choose(control: AccuracyControl, evaluate: _Evaluator, chosen: Sequence[str], start: float) -> AccuracyResult:
    history: list[dict[str, Any]] = []

    def measure(nodes: Sequence[str], step: str) -> tuple[float, float]:
        drop, sqnr = evaluate(nodes)
        history.append({"step": step, "float_nodes": len(nodes), "dice_drop": round(drop, 5),
                        "sqnr_db": round(sqnr, 2), "at_s": round(time.perf_counter() - start, 1)})
        return drop, sqnr

    budget = float(control.max_dice_drop)
    drop_all, sqnr_all = measure([], "all int8")

    def result(nodes: Sequence[str], drop: float, sqnr: float) -> AccuracyResult:
        return AccuracyResult(list(nodes), drop, drop_all, sqnr, evaluate.count, time.perf_counter() - start,
                              budget, control.metric, evaluate.engine_name, evaluate.isa, history)

    if drop_all <= budget:
        return result([], drop_all, sqnr_all)
    base = evaluate.sqnr([])
    gains = []
    for node in chosen:  # harm of a node = the SQNR gained by returning it alone to float
        sqnr = evaluate.sqnr([node])
        history.append({"step": f"harm {node}", "float_nodes": 1, "sqnr_db": round(sqnr, 2),
                        "at_s": round(time.perf_counter() - start, 1)})
        gains.append((-(sqnr - base), node))
    order = [node for _gain, node in sorted(gains)]
    limit = int(math.floor(len(order) * control.max_float_fraction))
    if limit < 1:
        raise AccuracyBudgetError(
            f"Dice drop {drop_all:.4f} ({control.metric}) with every layer INT8 exceeds max_dice_drop {budget:g}, "
            f"and max_float_fraction {control.max_float_fraction:g} allows no layer in float")
    drop_hi, sqnr_hi = measure(order[:limit], f"prefix {limit}")
    if drop_hi > budget:
        raise AccuracyBudgetError(
            f"max_dice_drop {budget:g} ({control.metric}) cannot be met: all INT8 drops {drop_all:.4f}; with the "
            f"{limit} most harmful of {len(order)} layers in float (max_float_fraction "
            f"{control.max_float_fraction:g}) it still drops {drop_hi:.4f} ({evaluate.count} evaluations). "
            "Raise the budget or max_float_fraction, or check the validation data")
    best = (limit, drop_hi, sqnr_hi)
    lo, hi = 1, limit  # smallest k in [lo, hi] whose prefix meets the budget; hi is known to meet it
    while lo < hi:
        mid = (lo + hi) // 2
        drop, sqnr = measure(order[:mid], f"prefix {mid}")
        if drop <= budget:
            hi, best = mid, (mid, drop, sqnr)
        else:
            lo = mid + 1
    k, drop, sqnr = best
    return result(order[:k], drop, sqnr)
