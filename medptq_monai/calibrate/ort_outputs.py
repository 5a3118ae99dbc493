"""ONNX Runtime output quantizers, calibrated with the activations and chosen under an SQNR budget.

The INT8 file puts Q/DQ on convolution inputs only (TensorRT's placement), and ONNX Runtime's CPU provider
runs a convolution in integer only as QLinearConv, which needs a quantized output: most convolutions of a
3-D U-Net, SegResNet or nnU-Net are read in float (InstanceNorm, residual Add) and run as float convolutions
between Q/DQ, so ONNX Runtime INT8 was no faster than its FP32 (``reports/ort_int8.md``).

Here the outputs of those convolutions (``ort_fused.output_quantizer_convs``) are calibrated in the same
pass and with the same calibrator as the activations, each gets a symmetric int8 scale, and the scales go
into the file's metadata (``ort_fused.OUTPUT_SCALES_KEY``), which ``OnnxRuntimeEngine`` turns into
``Q → DQ`` pairs at load (``ort_fused.add_output_quantizers``). TensorRT and OpenVINO read the graph as
before. Each quantizer adds rounding, so they are chosen under a budget: the SQNR (vs FP32) of the model
with them may fall at most ``budget_db`` below that of the file as written, measured on the first
``SELECTION_SAMPLES`` calibration samples. The candidates are ranked by their own SQNR on those samples
(the least noisy first) and the longest prefix within the budget is found by bisection (``log2(n) + 2``
runs of the model). The SQNRs are measured with ONNX Runtime's QDQ fusions off, i.e. the quantizers'
arithmetic, not a CPU's kernels.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper
from onnxruntime.quantization.calibrate import TensorsData

from ..engines.ort_fused import MIN_CHANNELS, OUTPUT_SCALES_KEY, add_output_quantizers, output_quantizer_convs
from ..errors import CalibrationError
from ..metrics import sqnr_db

DEFAULT_BUDGET_DB = float(__import__("os").environ.get("MEDPTQ_OUTQ_BUDGET", "0.3"))  # the bar is 0.5 dB against OpenVINO on unseen data; in-sample margin
SELECTION_SAMPLES = 2
SUMMARY_KEY = "medptq.ort.output_quantizers"


def check_budget(budget_db: object) -> float:
    """A budget in dB: a finite number >= 0 (0 adds no output quantizer)."""
    if isinstance(budget_db, bool) or not isinstance(budget_db, (int, float)) or not math.isfinite(budget_db) \
            or budget_db < 0:
        raise CalibrationError(f"ort_output_budget_db must be a number >= 0 (dB of SQNR; 0 turns ONNX Runtime "
                               f"output quantizers off), got {budget_db!r}")
    return float(budget_db)


def output_tensors(pre: onnx.ModelProto, chosen: Sequence[str], min_channels: int = MIN_CHANNELS) -> set[str]:
    """Outputs of the ``chosen`` Conv nodes of the FP32 model with at least ``min_channels`` input channels:
    the tensors calibrated for output quantizers (which of them qualify is decided on the INT8 graph)."""
    inits = {i.name: i for i in pre.graph.initializer}
    wanted = set(chosen)
    found = set()
    for node in pre.graph.node:
        if node.op_type != "Conv" or node.name not in wanted or len(node.input) < 2 or node.input[1] not in inits:
            continue
        group = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "group"), 1)
        if inits[node.input[1]].dims[1] * group >= min_channels:
            found.add(node.output[0])
    return found


@dataclass(frozen=True)
class OutputChoice:
    """The chosen output scales and what the choice measured (``reason`` says why there are none)."""

    scales: dict[str, float]
    candidates: int
    budget_db: float
    samples: int = 0
    sqnr_db_file: float | None = None
    sqnr_db_ort: float | None = None
    reason: str = ""

    def metadata(self) -> dict[str, str]:
        """``metadata_props`` entries: the scales (read by the engine) and a JSON summary."""
        summary = {"chosen": len(self.scales), "candidates": self.candidates, "budget_db": self.budget_db,
                   "samples": self.samples, "reason": self.reason,
                   "sqnr_db_file": None if self.sqnr_db_file is None else round(self.sqnr_db_file, 3),
                   "sqnr_db_ort": None if self.sqnr_db_ort is None else round(self.sqnr_db_ort, 3)}
        return {OUTPUT_SCALES_KEY: json.dumps(self.scales, sort_keys=True), SUMMARY_KEY: json.dumps(summary)}


def _scale(ranges: TensorsData, name: str) -> float | None:
    low, high = (float(v) for v in ranges[name].range_value)
    amax = max(abs(low), abs(high))
    return amax / 127.0 if math.isfinite(amax) and amax > 0 else None


def _session(model: onnx.ModelProto | str, fuse: bool = False) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if fuse
                                        else ort.GraphOptimizationLevel.ORT_ENABLE_BASIC)
    options.log_severity_level = 3
    source = model if isinstance(model, str) else model.SerializeToString()
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def _run(session: ort.InferenceSession, samples: Sequence[np.ndarray], names: Sequence[str] | None = None
         ) -> list[list[np.ndarray]]:
    feed = session.get_inputs()[0].name
    return [session.run(names, {feed: x}) for x in samples]


def _node_sqnr(values: Sequence[np.ndarray], scale: float) -> float:
    """SQNR of one tensor (over all samples) through ``Q(s8, scale, 0) → DQ``."""
    signal = noise = 0.0
    for y in values:
        q = np.clip(np.rint(y / np.float32(scale)), -128, 127) * np.float32(scale)
        signal += float(np.sum(np.square(y, dtype=np.float64)))
        noise += float(np.sum(np.square(q - y, dtype=np.float64)))
    return math.inf if noise == 0 else 10 * math.log10(max(signal, 1e-30) / noise)


def choose_output_scales(int8: onnx.ModelProto, pre_path: str | Path, ranges: TensorsData,
                         samples: Sequence[np.ndarray], budget_db: float) -> OutputChoice:
    """The longest least-noisy-first prefix of ``int8``'s output-quantizer candidates whose SQNR cost on
    ``samples`` (batch-1 inputs at the model's shape) stays within ``budget_db`` (module docstring)."""
    budget_db = check_budget(budget_db)
    scales = {c.output[0]: _scale(ranges, c.output[0]) for c in output_quantizer_convs(int8)
              if c.output[0] in ranges.data}
    scales = {k: v for k, v in scales.items() if v is not None}
    if budget_db == 0 or not scales or not samples:
        why = ("budget 0" if budget_db == 0 else "no convolution read in float with enough channels"
               if not scales else "no calibration sample kept")
        return OutputChoice({}, len(scales), budget_db, len(samples), reason=why)
    names = sorted(scales)
    probe = onnx.load(str(pre_path))
    probe.graph.output.extend([onnx.ValueInfoProto(name=n) for n in names])
    fp32 = _run(_session(probe), samples, names + [_output_name(int8)])
    del probe
    reference = [outs[-1] for outs in fp32]
    import os
    mode = os.environ.get("MEDPTQ_OUTQ_SCALE", "calib")
    if mode != "calib":
        for i, n in enumerate(names):
            vals = [outs[i] for outs in fp32]
            amax = max(float(np.abs(v).max()) for v in vals)
            if mode == "max":
                scales[n] = amax / 127
            else:
                cands = [amax * f / 127 for f in np.linspace(0.2, 1.0, 33)]
                scales[n] = max(cands, key=lambda c: _node_sqnr(vals, c))
    order = sorted(names, key=lambda n: (-_node_sqnr([outs[names.index(n)] for outs in fp32], scales[n]), n))
    del fp32

    def sqnr(count: int) -> float:
        model = onnx.ModelProto()
        model.CopyFrom(int8)
        add_output_quantizers(model, {n: scales[n] for n in order[:count]})
        got = [outs[0] for outs in _run(_session(model), samples)]
        return sqnr_db(np.concatenate([r.ravel() for r in reference]), np.concatenate([g.ravel() for g in got]))

    base = sqnr(0)
    best, best_db = len(order), sqnr(len(order))
    if base - best_db > budget_db:  # bisection: ``low`` quantizers fit the budget, ``high`` do not
        low, high, best_db = 0, len(order), base
        while high - low > 1:
            mid = (low + high) // 2
            db = sqnr(mid)
            if base - db <= budget_db:
                low, best_db = mid, db
            else:
                high = mid
        best = low
    chosen = {n: scales[n] for n in order[:best]}
    return OutputChoice(chosen, len(order), budget_db, len(samples), base, best_db,
                        "" if chosen else "the least noisy output quantizer alone exceeds the budget")


def _output_name(model: onnx.ModelProto) -> str:
    if not model.graph.output:
        raise CalibrationError("the INT8 model has no output")
    return model.graph.output[0].name
