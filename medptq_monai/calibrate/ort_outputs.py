"""ONNX Runtime output quantizers, chosen at quantize time under an SQNR budget (issue 9, point 4).

The INT8 file puts Q/DQ on convolution inputs only (TensorRT's placement), and ONNX Runtime's CPU provider
runs a convolution in integer only as QLinearConv, which needs a quantized output: most convolutions of a
3-D SegResNet or nnU-Net are read in float (InstanceNorm, residual Add) and run as float convolutions between
Q/DQ, so ONNX Runtime INT8 was no faster than its FP32 (``reports/ort_int8.md``).

Here each such convolution (``engines/ort_output_quantizers.output_quantizer_convs``) gets an int8 per-tensor
output quantizer from its FP32 output on the calibration patches (``OutputStats`` streams per-channel
statistics beside the calibration): asymmetric (a zero point), covering every value seen, in general; one read
only by an InstanceNorm is equalized first (each channel centred and scaled to one spread, which InstanceNorm
undoes), then quantized symmetrically, clipped where a kept subsample says that lowers the error
(``_ChannelStats.quantizer``). Each quantizer adds rounding the file does not have, so they are chosen under a
budget: the SQNR (vs FP32) of the model with them may fall at most ``budget_db`` below that of the file as
written, on each of the first ``SELECTION_SAMPLES`` calibration samples (each, not pooled: pooled, UNesT's
choice had lost 0.16 dB on them and about 0.5 dB on an unseen patch; README). All of them when that holds;
else each one's cost is measured alone on the first sample (one run each: a rounding-noise estimate from the
statistics had put VISTA3D's few costly ones, near the output, among the first), they are ordered by that cost
per multiply-accumulate of the convolution (the most speed for the dB first), the longest prefix within the
budget is found (galloping, then bisection), the one after it (which does not fit) is skipped and the search
goes on with the rest, up to ``MAX_SELECTION_RUNS`` runs of the model on all kept samples. The
model runs with ONNX Runtime's QDQ fusions off: the
quantizers' arithmetic, not a CPU's kernels. The choice goes into the file's metadata
(``ort_output_quantizers.KEY``, with a summary under ``SUMMARY_KEY``); TensorRT and OpenVINO read the graph
as before. A network calibrated at a smaller roi than it runs at (``quantize_onnx``'s ``calibration_model``,
VISTA3D) gets its statistics and its choice there, on that export's INT8 copy: the tensor names are the same.
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from ..engines.ort_fused import MIN_CHANNELS, _graph_maps
from ..engines.ort_output_quantizers import (
    KEY, OutputQuantizer, add_output_quantizers, applicable_output_quantizers, float16_values, instance_norm_epsilon,
    metadata_value, output_quantizer_convs,
)
from ..errors import CalibrationError
from ..metrics import sqnr_db_from_sums, sum_of_squares

# a margin under the 0.5 dB (vs OpenVINO) on unseen data: a choice costs about twice as much there as on
# the samples it was made on (quick bench, UNesT: 0.25 dB per sample cost 0.51 on the bench patch; at 0.2, 0.12)
DEFAULT_BUDGET_DB = 0.2
SELECTION_SAMPLES = 2
MAX_SELECTION_RUNS = 12  # model runs of the choice (each on SELECTION_SAMPLES samples), the first two included
SUMMARY_KEY = "medptq.ort.output_quantizers_choice"
EPS_MARGIN = 100.0  # equalize a channel when its variance dwarfs the InstanceNorm epsilon (< 0.5% change)
KEEP_SAMPLES, KEEP_PER_SAMPLE = 16, 2048  # the values kept per tensor and channel for the clip (4 MB at 32 channels)
CLIP_LOWEST, CLIP_STEPS = 0.2, 33  # clips tried: 0.2-1.0 of the range, in steps of 2.5%


def check_budget(budget_db: object) -> float:
    """A budget in dB: a finite number >= 0 (0 adds no output quantizer)."""
    if isinstance(budget_db, bool) or not isinstance(budget_db, (int, float)) or not math.isfinite(budget_db) \
            or budget_db < 0:
        raise CalibrationError(f"ort_output_budget_db must be a number >= 0 (dB of SQNR; 0 turns ONNX Runtime "
                               f"output quantizers off), got {budget_db!r}")
    return float(budget_db)


@dataclass(frozen=True)
class OutputChoice:
    """The chosen output quantizers and what the choice measured (``reason`` says why there are none)."""

    quantizers: dict[str, OutputQuantizer] = field(default_factory=dict)
    candidates: int = 0
    budget_db: float = DEFAULT_BUDGET_DB
    samples: int = 0
    sqnr_db_file: float | None = None
    sqnr_db_ort: float | None = None
    reason: str = ""

    def summary(self) -> dict[str, object]:
        """What was chosen and measured, for the metadata and the quantize summary."""
        rounded = {k: None if v is None else round(v, 3) for k, v in
                   (("sqnr_db_file", self.sqnr_db_file), ("sqnr_db_ort", self.sqnr_db_ort))}
        return {"chosen": len(self.quantizers), "candidates": self.candidates, "budget_db": self.budget_db,
                "samples": self.samples, **rounded, "reason": self.reason}

    def metadata(self) -> dict[str, str]:
        """``metadata_props`` entries: the quantizers (read by the engine) and the summary."""
        return {KEY: metadata_value(self.quantizers), SUMMARY_KEY: json.dumps(self.summary())}


def _clip_by_error(z: np.ndarray, amax: float, weight: np.ndarray) -> tuple[float, float]:
    """The symmetric int8 clip of ``z`` (channels x values, at most ``amax``) with the least rounding + clipping
    error, each channel's mean squared error times its ``weight``; returns (clip, that error)."""
    best = (amax, math.inf)
    for clip in amax * np.linspace(CLIP_LOWEST, 1.0, CLIP_STEPS):
        scale = clip / 127.0
        error = np.mean(np.square(np.clip(np.round(z / scale), -127, 127) * scale - z), axis=1)
        best = min(best, (float(clip), float(np.mean(error * weight))), key=lambda b: b[1])
    return best


class _ChannelStats:
    """Per-channel count, sum, sum of squares, min and max of one tensor over the samples (float64), and a
    seeded subsample of its values (``KEEP_PER_SAMPLE`` voxels of each of the first ``KEEP_SAMPLES`` samples)."""

    def __init__(self, channels: int, seed: int = 0) -> None:
        self.count, self.samples = 0, 0
        self.total, self.squares = np.zeros(channels), np.zeros(channels)
        self.low, self.high = np.full(channels, np.inf), np.full(channels, -np.inf)
        self.rng, self.kept = np.random.default_rng(seed), []

    def add(self, y: np.ndarray) -> None:
        """Add a batch ``[N, C, ...]``: each sample read in place, sums accumulated in float64 (no float64 copy)."""
        for sample in np.ascontiguousarray(y):
            flat = sample.reshape(sample.shape[0], -1)
            self.count += flat.shape[1]
            self.samples += 1
            self.total += flat.sum(axis=1, dtype=np.float64)
            self.squares += np.einsum("ij,ij->i", flat, flat, dtype=np.float64)
            self.low = np.minimum(self.low, flat.min(axis=1))
            self.high = np.maximum(self.high, flat.max(axis=1))
            if len(self.kept) < KEEP_SAMPLES:
                self.kept.append(flat[:, self.rng.integers(0, flat.shape[1], KEEP_PER_SAMPLE)])

    def moments(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-channel mean and variance over every value seen."""
        mean = self.total / self.count
        return mean, np.maximum(self.squares / self.count - np.square(mean), 0.0)

    def quantizer(self, epsilon: float | None) -> OutputQuantizer | None:
        """The int8 quantizer of this tensor; None for an all-zero one. In general one asymmetric range covering
        every value seen (and 0) spans the 256 levels. With ``epsilon`` (an InstanceNorm reader's) the tensor is
        equalized first (InstanceNorm removes any shift and scale per channel): each channel is centred, on its
        mean or its range, and those whose variance exceeds ``EPS_MARGIN`` times the epsilon are scaled to the
        widest spread, standard deviation or half-range (below that the epsilon matters to InstanceNorm, and they
        keep their own); then one symmetric scale quantizes them, clipped where that lowers the error on the kept
        values (``_clip_by_error``; a few clipped extremes barely move InstanceNorm's statistics). Of the two
        equalizations the one with the least error after InstanceNorm is taken."""
        mean, var = self.moments()
        wide = var > EPS_MARGIN * epsilon if epsilon is not None else np.zeros(len(var), bool)
        if np.any(wide) and self.kept:
            kept, best = np.concatenate(self.kept, axis=1).astype(np.float64), None
            for shift, spread in ((mean, np.sqrt(var)), ((self.high + self.low) / 2.0, (self.high - self.low) / 2.0)):
                alpha = float16_values(np.where(wide, spread[wide].max() / np.maximum(spread, 1e-30), 1.0))
                shift = float16_values(shift)  # what the metadata holds (alpha: a float16 0 or inf is refused)
                if not np.all((alpha > 0) & np.isfinite(alpha)):
                    continue
                amax = float(np.max(alpha * np.maximum(self.high - shift, shift - self.low)))
                if not 0 < amax < math.inf:
                    continue
                # InstanceNorm divides each channel by its spread: weigh its error by 1 / its variance
                clip, error = _clip_by_error(alpha[:, None] * (kept - shift[:, None]), amax,
                                             1.0 / (np.square(alpha) * var + epsilon))
                if best is None or error < best[0]:
                    best = (error, OutputQuantizer(clip / 127.0, tuple(float(a) for a in alpha),
                                                   tuple(float(m) for m in shift)))
            if best is not None:
                return best[1]
        low, high = min(float(self.low.min()), 0.0), max(float(self.high.max()), 0.0)
        if not 0 < high - low < math.inf:
            return None
        scale = (high - low) / 255.0
        return OutputQuantizer(scale, zero_point=int(np.clip(round(-128.0 - low / scale), -128, 127)))


def _session(model: onnx.ModelProto, arena: bool = True) -> ort.InferenceSession:
    """A CPU session without QDQ fusion; ``arena`` False returns its activations' memory after each run (the
    statistics' extra outputs must not stay reserved while the calibration runs beside them)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC  # no QDQ fusion
    options.enable_cpu_mem_arena = arena
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _outputs(model: onnx.ModelProto, samples: Sequence[np.ndarray]) -> list[np.ndarray]:
    session = _session(model)
    feed = session.get_inputs()[0].name
    return [session.run(None, {feed: x})[0] for x in samples]


def output_tensors(pre: onnx.ModelProto, chosen: Sequence[str], min_channels: int = MIN_CHANNELS) -> list[str]:
    """Outputs of the ``chosen`` Conv nodes of the FP32 model with at least ``min_channels`` input channels:
    the tensors ``OutputStats`` follows (which of them qualify is decided on the INT8 graph)."""
    inits = {i.name: i for i in pre.graph.initializer}
    wanted, found = set(chosen), []
    for node in pre.graph.node:
        if node.op_type != "Conv" or node.name not in wanted or len(node.input) < 2 or node.input[1] not in inits:
            continue
        group = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "group"), 1)
        if inits[node.input[1]].dims[1] * group >= min_channels:
            found.append(node.output[0])
    return found


class OutputStats:
    """Per-channel statistics of ``names`` (tensors of the FP32 model at ``pre_path``) over every patch given
    to ``add``, one FP32 run per patch; the first ``SELECTION_SAMPLES`` samples and their FP32 outputs are kept
    for the choice."""

    def __init__(self, pre_path: str | Path, names: Sequence[str]) -> None:
        probe = onnx.load(str(pre_path))
        self.output = probe.graph.output[0].name
        probe.graph.output.extend([onnx.ValueInfoProto(name=n) for n in names])
        self.session = _session(probe, arena=False)
        self.feed, self.names = self.session.get_inputs()[0].name, list(names)
        self.stats: dict[str, _ChannelStats] = {}
        self.samples: list[np.ndarray] = []
        self.reference: list[np.ndarray] = []

    def add(self, patch: np.ndarray) -> None:
        """Run each sample of ``patch`` (a batch) through the FP32 model and update the statistics."""
        for sample in np.asarray(patch, np.float32):
            values = self.session.run([self.output, *self.names], {self.feed: sample[None]})
            if len(self.samples) < SELECTION_SAMPLES:
                self.samples.append(sample[None].copy())
                self.reference.append(values[0])
            for name, y in zip(self.names, values[1:]):
                self.stats.setdefault(name, _ChannelStats(y.shape[1], zlib.crc32(name.encode()))).add(y)

    def observe(self, patches: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        """Pass ``patches`` on, adding each to the statistics first."""
        for patch in patches:
            self.add(patch)
            yield patch


def _macs(conv: onnx.NodeProto, producer: Mapping[str, onnx.NodeProto], inits: Mapping[str, onnx.TensorProto],
          stats: _ChannelStats) -> float:
    """Multiply-accumulates of ``conv`` per sample: output voxels x output channels x weight elements per
    output channel (from its weight's shape and the statistics' voxel count)."""
    weight = inits[producer[conv.input[1]].input[0]]
    voxels = stats.count / max(stats.samples, 1)
    return float(voxels * weight.dims[0] * np.prod(weight.dims[1:]))


def choose_output_quantizers(int8: onnx.ModelProto, observed: OutputStats, budget_db: float,
                             target: onnx.ModelProto | None = None) -> OutputChoice:
    """The output quantizers of ``int8`` whose SQNR cost on ``observed``'s kept samples stays within
    ``budget_db`` (module docstring). ``target``: the model the choice is for when ``int8`` is its copy at the
    calibration roi (same graph, another input shape: the choice is measured on ``int8`` and keeps only
    quantizers that apply to both)."""
    budget_db = check_budget(budget_db)
    samples = observed.samples
    if budget_db == 0 or not samples:
        return OutputChoice(budget_db=budget_db, samples=len(samples),
                            reason="budget 0" if budget_db == 0 else "no calibration sample kept")
    convs = [c for c in output_quantizer_convs(int8) if c.output[0] in observed.stats]
    producer, readers = _graph_maps(int8.graph)
    epsilon = {c.output[0]: instance_norm_epsilon(c, int8, readers) for c in convs}
    measured = {n: observed.stats[n].quantizer(e) for n, e in epsilon.items()}
    measured = {k: q for k, q in measured.items() if q is not None}
    applies = set(applicable_output_quantizers(int8, measured))
    if target is not None:
        applies &= set(applicable_output_quantizers(target, measured))
    measured = {n: q for n, q in measured.items() if n in applies}
    if not measured:
        return OutputChoice(budget_db=budget_db, samples=len(samples),
                            reason="no convolution read in float with enough input channels")
    signal = np.array([sum_of_squares(r) for r in observed.reference])
    pooled: dict[tuple[str, ...], float] = {}  # SQNR over all kept samples (as sqnr_db of them concatenated)

    def sqnr(names: Sequence[str], count: int) -> np.ndarray:
        """The SQNR (dB) of each of the first ``count`` kept samples with ``names``' quantizers."""
        model = onnx.ModelProto()
        model.CopyFrom(int8)
        add_output_quantizers(model, {n: measured[n] for n in names})
        noise = np.array([sum_of_squares(r - o) for r, o in zip(observed.reference, _outputs(model, samples[:count]))])
        if count == len(samples):
            pooled[tuple(names)] = sqnr_db_from_sums(float(signal.sum()), float(noise.sum()))
        return np.array([sqnr_db_from_sums(s, n) for s, n in zip(signal, noise)])

    def drop(names: Sequence[str]) -> float:
        """The largest SQNR drop (vs the file as written) on any one kept sample with ``names``' quantizers."""
        return float(np.max(base - sqnr(names, len(samples))))

    names = sorted(measured)
    base = sqnr([], len(samples))
    best = names
    if drop(names) > budget_db:  # the least dB per multiply-accumulate first: the most speed for the budget
        alone = {n: float(base[0] - sqnr([n], 1)[0]) for n in names}  # each one's cost on the first sample
        inits = {i.name: i for i in int8.graph.initializer}
        work = {c.output[0]: _macs(c, producer, inits, observed.stats[c.output[0]]) for c in convs
                if c.output[0] in alone}
        best = _longest_fitting(sorted(names, key=lambda n: (max(alone[n], 0.0) / work[n], -work[n], n)),
                                budget_db, drop)
    return OutputChoice({n: measured[n] for n in best}, len(names), budget_db, len(samples), pooled[()],
                        pooled[tuple(best)], "" if best else "no output quantizer fitted the budget "
                        "(MAX_SELECTION_RUNS runs)")


def _longest_fitting(order: Sequence[str], budget_db: float, drop: Callable[[Sequence[str]], float]) -> list[str]:
    """Walk ``order``: with what is taken, find the longest prefix of what is left that fits (galloping: 1, 2, 4,
    ... then bisection, so a first one that does not fit costs one run), take it, skip the one after it (it does
    not fit), go on with the rest; at most ``MAX_SELECTION_RUNS - 2`` runs of ``drop`` (the SQNR the model
    loses with the given quantizers; ``budget_db`` fits)."""
    taken: list[str] = []
    rest, runs = list(order), 2

    def fits(count: int) -> bool:
        nonlocal runs
        runs += 1
        return drop([*taken, *rest[:count]]) <= budget_db

    while rest and runs < MAX_SELECTION_RUNS:
        low, high = 0, None  # ``taken`` + the first ``low`` fit, + the first ``high`` do not
        while high is None and runs < MAX_SELECTION_RUNS:
            size = min(max(2 * low, 1), len(rest))
            if fits(size):
                low = size
                if low == len(rest):
                    return [*taken, *rest]
            else:
                high = size
        while high is not None and high - low > 1 and runs < MAX_SELECTION_RUNS:
            mid = (low + high) // 2
            low, high = (mid, high) if fits(mid) else (low, mid)
        if high is None or high - low > 1:  # out of runs
            return [*taken, *rest[:low]]
        taken, rest = [*taken, *rest[:low]], rest[high:]
    return taken
