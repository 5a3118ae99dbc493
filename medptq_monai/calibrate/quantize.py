"""FP32 ONNX → compact INT8 QDQ ONNX for TensorRT explicit quantization and CPU INT8 engines.

Placement (TensorRT's recommended pattern): Q/DQ on the *inputs* of Conv, ConvTranspose and
weight MatMul/Gemm — int8 weights per output channel (axis 0 for Conv, the output axis for
MatMul/Gemm) and per tensor for ConvTranspose (see ``write_qdq``), int8 activations per tensor,
every zero point 0. Outputs,
biases, normalisation layers, Softmax and GELU stay in floating point. Weights are stored as
int8 initializers feeding DequantizeLinear, so the file is ~4x smaller than FP32.

Calibration streams patches (``calibrators.collect_ranges``); the Q/DQ rewrite is ONNX
Runtime's ``quantize_static`` fed with those ranges through its calibration cache.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.calibrate import TensorsData, save_tensors_data

from .. import __version__
from ..errors import CalibrationError, UnknownNameError
from ..export.onnx_model import io_spec, load_onnx, metadata, save_onnx, set_metadata
from ..export.trt_check import assert_tensorrt_compatible
from ..fileio import sha256_file
from .accuracy_control import AccuracyControl, AccuracyResult, choose_float_nodes
from .calibrators import CALIBRATORS, DEFAULT_CALIBRATOR, MAX_PASS_BYTES, check_calibrator, collect_ranges
from .ort_outputs import DEFAULT_BUDGET_DB, OutputChoice, OutputStats, check_budget, choose_output_quantizers, \
    output_tensors

DEFAULT_OP_TYPES = ("Conv", "ConvTranspose", "MatMul", "Gemm")
HIGH_PRECISIONS = ("fp32", "fp16")  # what is not INT8: FP32 (default) or FP16 (export/fp16_remainder.py)


@dataclass
class QuantizeOptions:
    """What to quantize and how to calibrate (``seed`` is the patch sampler's, recorded in the model).

    ``exclude`` holds ``fnmatch`` patterns over ONNX node names kept in float. MatMuls between
    two activations (attention scores) stay float unless ``quantize_activation_matmul``.
    ``max_pass_bytes`` bounds the activations one calibration pass holds (more passes above it).
    TensorRT variants of the written file: ``high_precision`` ``"fp16"`` stores and computes what is not
    INT8 in FP16 (``export/fp16_remainder.py``); ``rewrite_deconv`` turns stride-2 kernel-2 ConvTranspose
    into a per-channel INT8 1x1x1 Conv + depth-to-space (``export/deconv_rewrite.py``).
    ONNX Runtime: ``ort_output_budget_db`` is the SQNR the output quantizers recorded for it may cost
    (``ort_outputs``; 0: none).
    """

    calibrator: str = DEFAULT_CALIBRATOR
    seed: int = 0
    percentile: float = 99.99
    op_types: Sequence[str] = DEFAULT_OP_TYPES
    exclude: Sequence[str] = field(default_factory=tuple)
    quantize_activation_matmul: bool = False
    max_pass_bytes: int = MAX_PASS_BYTES
    high_precision: str = "fp32"
    rewrite_deconv: bool = False
    ort_output_budget_db: float = DEFAULT_BUDGET_DB

    def __post_init__(self) -> None:
        check_calibrator(self.calibrator)
        check_high_precision(self.high_precision)
        self.ort_output_budget_db = check_budget(self.ort_output_budget_db)


def check_high_precision(name: str) -> None:
    """Raise ``UnknownNameError`` unless ``name`` is one of ``HIGH_PRECISIONS``."""
    if name not in HIGH_PRECISIONS:
        raise UnknownNameError(f"unknown high_precision {name!r}; choose one of {list(HIGH_PRECISIONS)}")


def apply_tensorrt_variants(int8: onnx.ModelProto, options: QuantizeOptions,
                            fp32: onnx.ModelProto | None = None) -> tuple[onnx.ModelProto, dict[str, object]]:
    """The QDQ model with ``options``' TensorRT variants applied (deconv rewrite first, then the FP16
    remainder) and the ``medptq.*`` metadata recording them. ``fp32``: the FP32 source, whose weights
    the rewritten Convs are requantized from per output channel."""
    from ..export.deconv_rewrite import float_deconv_weights, rewrite_deconv
    from ..export.fp16_remainder import convert_remainder_fp16

    meta: dict[str, object] = {"medptq.high_precision": options.high_precision}
    if options.rewrite_deconv:
        report = rewrite_deconv(int8, float_deconv_weights(fp32) if fp32 is not None else None)
        meta.update(report.metadata())
    if options.high_precision == "fp16":
        int8, fp16 = convert_remainder_fp16(int8)
        meta.update(fp16.metadata())
    return int8, meta


def apply_tensorrt_variants_file(int8_path: str | os.PathLike, high_precision: str = "fp32",
                                 rewrite_deconv: bool = False, fp32_path: str | os.PathLike | None = None,
                                 out_path: str | os.PathLike | None = None) -> dict[str, str]:
    """Apply the TensorRT variants to an INT8+FP32 QDQ file written by :func:`quantize_onnx`, in place or to
    ``out_path`` (checked, atomic: nothing is written on error); returns the metadata added."""
    check_high_precision(high_precision)
    model = load_onnx(int8_path)
    done = metadata(model)
    if done.get("medptq.high_precision", "fp32") != "fp32" or "medptq.deconv_rewrite" in done:
        raise CalibrationError(f"{int8_path} already carries TensorRT variants ({done.get('medptq.high_precision')}, "
                               f"deconv rewrite: {'medptq.deconv_rewrite' in done}); start from the INT8+FP32 file")
    fp32 = load_onnx(fp32_path) if fp32_path is not None else None
    options = QuantizeOptions(high_precision=high_precision, rewrite_deconv=rewrite_deconv)
    model, meta = apply_tensorrt_variants(model, options, fp32)
    set_metadata(model, meta)
    assert_tensorrt_compatible(model, name=str(out_path or int8_path))
    save_onnx(model, out_path or int8_path)
    return {k: str(v) for k, v in meta.items()}


@dataclass
class QuantizeResult:
    """Where the INT8 model went and what was quantized."""

    path: Path
    num_patches: int
    quantized_nodes: list[str]
    excluded_nodes: list[str]
    metadata: dict[str, str]
    accuracy: AccuracyResult | None = None  # what accuracy control chose and measured, when it ran


def select_nodes(model: onnx.ModelProto, options: QuantizeOptions) -> tuple[list[str], list[str], set[str]]:
    """(nodes to quantize, nodes excluded by pattern or rule, activation tensors to calibrate)."""
    inits = {i.name for i in model.graph.initializer}
    consts = {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    weights = inits | consts
    chosen, excluded, tensors = [], [], set()
    for node in model.graph.node:
        if node.op_type not in options.op_types:
            continue
        if not node.name:
            raise CalibrationError(f"unnamed {node.op_type} node: run onnx export with node names")
        acts = [t for t in node.input[:2] if t and t not in weights]
        matmul_of_activations = node.op_type in ("MatMul", "Gemm") and len(acts) == 2
        if any(fnmatch.fnmatchcase(node.name, pat) for pat in options.exclude) or (
            matmul_of_activations and not options.quantize_activation_matmul
        ):
            excluded.append(node.name)
            continue
        chosen.append(node.name)
        tensors.update(acts)
    return chosen, excluded, tensors


def restore_float_inputs(model: onnx.ModelProto, nodes: Sequence[str]) -> int:
    """Reconnect activation inputs of ``nodes`` that ONNX Runtime routed through a shared Q→DQ pair
    back to the float tensor, then drop Q/DQ nodes left without consumers. Returns inputs restored.

    ONNX Runtime quantizes a tensor once for all its consumers, so a float node (an excluded
    convolution, a residual Add, a skip Concat) reads the dequantized tensor whenever another
    consumer of the same tensor is quantized. Only quantized nodes should pay that rounding.
    """
    producer = {o: n for n in model.graph.node for o in n.output}
    inits = {i.name for i in model.graph.initializer}
    wanted, restored = set(nodes), 0
    for node in model.graph.node:
        if node.name not in wanted:
            continue
        for i, name in enumerate(node.input):
            dq = producer.get(name)
            if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] in inits:
                continue
            q = producer.get(dq.input[0])
            if q is not None and q.op_type == "QuantizeLinear":
                node.input[i] = q.input[0]
                restored += 1
    graph_outputs = {o.name for o in model.graph.output}
    while True:
        used = {i for n in model.graph.node for i in n.input} | graph_outputs
        dead = [n for n in model.graph.node
                if n.op_type in ("QuantizeLinear", "DequantizeLinear") and not set(n.output) & used]
        if not dead:
            break
        for n in dead:
            model.graph.node.remove(n)
    return restored


def _checked(patches: Iterable[np.ndarray], want: Sequence[int | None]) -> Iterator[np.ndarray]:
    for i, patch in enumerate(patches):
        shape = tuple(np.shape(patch))
        if len(shape) != len(want) or any(w is not None and w != g for w, g in zip(want[1:], shape[1:], strict=True)):
            raise CalibrationError(
                f"calibration patch {i} has shape {shape}; the model input is "
                f"{tuple('N' if w is None else w for w in want)}"
            )
        yield patch


def preprocess(fp32_path: str | os.PathLike, out: Path) -> onnx.ModelProto:
    """Quantization pre-processing → ``out``: ONNX shape inference only, file to file.

    This is ONNX Runtime's ``quant_pre_process`` without its graph optimisation (constant folding
    expanded SwinUNETR's relative position bias, a 0.8 MB table gathered at run time, into a 75 MB
    constant) and without its in-Python model copies (2.2 GB extra peak for VISTA3D's 785 MB
    model). The torch export already folds BatchNorm into the convolutions.
    """
    onnx.shape_inference.infer_shapes_path(str(fp32_path), str(out))
    return load_onnx(out)


def _convtranspose_weights(pre: Path, chosen: Sequence[str]) -> list[str]:
    """Names of the constant weights of the ``chosen`` ConvTranspose nodes in ``pre``."""
    model = onnx.load(str(pre), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    wanted = set(chosen)
    return sorted({n.input[1] for n in model.graph.node
                   if n.op_type == "ConvTranspose" and n.name in wanted and len(n.input) > 1 and n.input[1] in inits})


def write_qdq(
    pre: Path, ranges: TensorsData, options: QuantizeOptions, chosen: Sequence[str], excluded: Sequence[str],
    work: Path,
) -> onnx.ModelProto:
    """Insert Q/DQ into the pre-processed model for ``chosen`` nodes with the given activation ranges."""
    cache, raw = work / "ranges.json", work / "qdq.onnx"
    # ConvTranspose weights get ONE scale (per tensor). The per-channel axis TensorRT takes for them is not
    # settled by NVIDIA's public sources: NVIDIA/TensorRT#2380 (2022, TRT 8.x: its deconvolution kernels take
    # per-input-channel scales, axis 0 of the (Cin, Cout/g, k...) weight, and per-output-channel scales are
    # unsupported), #1694 (axis 1 gave wrong results), and ModelOpt's torch default
    # (NVIDIA/Model-Optimizer modelopt/torch/quantization/tensor_quant.py: ConvTranspose weights axis 0) say
    # axis 0; ModelOpt's own ONNX PTQ for TRT 10 (modelopt/onnx/quantization/ort_utils.py, configure_ort:
    # "ConvTranspose": 1) writes axis 1. A per-tensor weight scale is read the same way under both, and
    # TensorRT accepts it for every layer. Measured (small MONAI UNet, Intel Xeon, OpenVINO 2026.4,
    # onnxruntime 1.32): axis 0 makes OpenVINO run both Deconvolutions in f32, per tensor keeps them i8.
    # QDQOpTypePerChannelSupportToAxis would not do: onnxruntime's QDQConv ignores it for ConvTranspose.
    overrides = {w: [{"symmetric": True}] for w in _convtranspose_weights(pre, chosen)}
    save_tensors_data(ranges, cache)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # ONNX Runtime's quantizer logs through the root logger
    try:
        quantize_static(
            str(pre),
            str(raw),
            calibration_data_reader=None,
            calibration_cache_path=str(cache),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(options.op_types),
            per_channel=True,
            reduce_range=False,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            nodes_to_quantize=list(chosen),
            nodes_to_exclude=list(excluded),
            calibrate_method=ranges.calibration_method,
            extra_options={
                "ActivationSymmetric": True,
                "WeightSymmetric": True,
                "QuantizeBias": False,
                "OpTypesToExcludeOutputQuantization": list(options.op_types),
                "DedicatedQDQPair": False,
                "TensorQuantOverrides": overrides,
            },
        )
    finally:
        root.setLevel(level)
    model = onnx.load(str(raw))
    quantized = set(chosen)
    restore_float_inputs(model, [n.name for n in model.graph.node if n.name not in quantized
                                 and n.op_type not in ("QuantizeLinear", "DequantizeLinear")])
    return model


def _no_ort_outputs(options: QuantizeOptions) -> str:
    """Why ``quantize_onnx`` chooses no ONNX Runtime output quantizer without measuring ("" when it measures)."""
    if options.ort_output_budget_db == 0:
        return "budget 0"
    if options.high_precision != "fp32":
        return f"high_precision {options.high_precision}"
    return ""


def quantize_onnx(
    fp32_path: str | os.PathLike,
    out_path: str | os.PathLike,
    patches: Iterable[np.ndarray],
    options: QuantizeOptions | None = None,
    source_sha256: str | None = None,
    on_patch: Callable[[int], None] | None = None,
    calibration_model: str | os.PathLike | None = None,
    accuracy: AccuracyControl | None = None,
) -> QuantizeResult:
    """Calibrate ``fp32_path`` on ``patches`` and write the INT8 QDQ model to ``out_path`` atomically.

    ``calibration_model`` is the same network exported at the (smaller) patch size of ``patches``: its
    activation ranges are computed there and applied to ``fp32_path``'s tensors of the same names; so are the
    ONNX Runtime output quantizers, chosen on its own INT8 copy.
    ``accuracy``: return the most harmful layers to float until its Dice budget holds on its validation
    patches (``accuracy_control.choose_float_nodes``); nothing is written when it cannot be met.
    The result passes ``onnx.checker`` and the static TensorRT check before it is written;
    ``metadata_props`` record calibrator, patch count, seed, source sha256, package version, the
    TensorRT variants applied (``apply_tensorrt_variants``) and the output quantizers chosen for ONNX Runtime
    on the first calibration samples (``ort_outputs``).
    """
    options = options or QuantizeOptions()
    fp32_path = Path(fp32_path)
    source = load_onnx(fp32_path, load_weights=False)
    spec, source_meta = io_spec(source), metadata(source)
    del source  # the weights are in memory (inline data): not kept through calibration
    with tempfile.TemporaryDirectory(prefix="medptq-quant-") as work:
        work = Path(work)
        pre = work / "preprocessed.onnx"
        pre_model = preprocess(fp32_path, pre)
        chosen, excluded, tensors = select_nodes(pre_model, options)
        no_ort_outputs = _no_ort_outputs(options)  # ONNX Runtime output quantizers need an FP32 remainder
        followed = [] if no_ort_outputs else output_tensors(pre_model, chosen)
        del pre_model
        calib_pre, calib_spec = pre, spec
        if calibration_model is not None:
            calib_pre, calib_spec = work / "calibration.onnx", io_spec(load_onnx(calibration_model, load_weights=False))
            if (calib_spec.input_name, calib_spec.input_shape[1]) != (spec.input_name, spec.input_shape[1]):
                raise CalibrationError(f"calibration model {calibration_model} has input {calib_spec.input_name} "
                                       f"{calib_spec.input_shape}; {fp32_path} has {spec.input_name} {spec.input_shape}")
            preprocess(calibration_model, calib_pre)
        observed = OutputStats(calib_pre, followed) if followed else None  # same tensor names at either roi
        stream = _checked(patches, calib_spec.input_shape)
        ranges, count = collect_ranges(
            calib_pre, spec.input_name, stream if observed is None else observed.observe(stream), options.calibrator,
            tensors, work, percentile=options.percentile, on_patch=on_patch, max_pass_bytes=options.max_pass_bytes,
        )
        decision = None
        if accuracy is not None:
            def variant(float_nodes: Sequence[str]) -> onnx.ModelProto:
                floated = set(float_nodes)
                return write_qdq(pre, ranges, options, [n for n in chosen if n not in floated],
                                 [*excluded, *float_nodes], work)

            decision = choose_float_nodes(accuracy, pre, chosen, variant)
            floated = set(decision.float_nodes)
            chosen = [n for n in chosen if n not in floated]
            excluded = [*excluded, *decision.float_nodes]

        def qdq(source: Path) -> tuple[onnx.ModelProto, dict[str, object]]:
            model = write_qdq(source, ranges, options, chosen, excluded, work)
            return apply_tensorrt_variants(model, options, load_onnx(source) if options.rewrite_deconv else None)

        int8, variants = qdq(pre)
        if observed is None:
            ort_choice = OutputChoice(budget_db=options.ort_output_budget_db,
                                      reason=no_ort_outputs or "no quantized convolution with enough input channels")
        elif calibration_model is None:
            ort_choice = choose_output_quantizers(int8, observed, options.ort_output_budget_db)
        else:  # measured where the samples fit: the same INT8 graph at the calibration roi
            ort_choice = choose_output_quantizers(qdq(calib_pre)[0], observed, options.ort_output_budget_db, int8)
        del observed
        meta = {
            "medptq.version": __version__,
            "medptq.precision": "int8",
            "medptq.calibrator": options.calibrator,
            "medptq.num_patches": count,
            "medptq.seed": options.seed,
            "medptq.quantized_nodes": len(chosen),
            "medptq.excluded_nodes": ",".join(excluded),
            "medptq.fp32_sha256": sha256_file(fp32_path),
            **variants,
            **(decision.metadata() if decision is not None else {}),
            **ort_choice.metadata(),
        }
        if CALIBRATORS[options.calibrator].uses_percentile:
            meta["medptq.percentile"] = options.percentile
        if calibration_model is not None:
            meta["medptq.calibration_roi"] = "x".join(str(d) for d in calib_spec.input_shape[2:])
        sha = source_sha256 or source_meta.get("medptq.source_sha256")
        if sha:
            meta["medptq.source_sha256"] = sha
        for key in ("medptq.source", "medptq.source_digest"):  # which checkpoint the FP32 model came from
            if key in source_meta:
                meta[key] = source_meta[key]
        set_metadata(int8, meta)
        assert_tensorrt_compatible(int8, name=str(out_path))
        save_onnx(int8, out_path)
    return QuantizeResult(Path(out_path), count, chosen, excluded, {k: str(v) for k, v in meta.items()}, decision)
