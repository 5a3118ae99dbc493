"""Output quantizers that the INT8 file records for ONNX Runtime only, added to its load-time copy.

ONNX Runtime's CPU provider runs a convolution in integer only as QLinearConv, made from
``DQ(x), DQ(w) → Conv → Q``. The INT8 file quantizes convolution inputs only (TensorRT's placement), so a
convolution read in float (by InstanceNorm, a residual Add, a Concat) runs as a float convolution between
Q/DQ. ``calibrate/ort_outputs.py`` chooses, at quantize time and under an SQNR budget, output quantizers for
such convolutions and records them in the file's metadata (``KEY``); TensorRT and OpenVINO never read them.
``add_output_quantizers`` puts ``Q(s8, scale, zero_point) → DQ`` after each, so ONNX Runtime fuses a QLinearConv
(int8 like the convolution's input, which the fusion needs; the zero point lets the 256 levels span a
one-sided range).

A convolution read only by an InstanceNormalization may also be equalized: InstanceNorm gives the same
result for ``alpha_c * (y_c - shift_c)`` as for ``y_c`` (``alpha_c > 0``; its epsilon aside), so each output
channel is centred and scaled to one spread before the one per-tensor scale quantizes it: the weight
scales are multiplied by ``alpha`` and the bias becomes ``alpha * (bias - shift)``.
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .ort_fused import MIN_CHANNELS, _graph_maps, quantized_conv_inputs

KEY = "medptq.ort.output_quantizers"  # metadata_props: JSON {convolution output tensor: OutputQuantizer}


@dataclass(frozen=True)
class OutputQuantizer:
    """An int8 per-tensor ``scale`` and ``zero_point`` for one convolution output, after an optional
    per-channel equalization ``alpha * (y - shift)`` (InstanceNorm readers only; float16 values, stored
    compactly: a few hundred channels must not cost the INT8 file its size, ``float16_values``)."""

    scale: float
    alpha: tuple[float, ...] | None = None
    shift: tuple[float, ...] | None = None
    zero_point: int = 0

    def to_json(self) -> dict[str, object]:
        """The metadata form."""
        out: dict[str, object] = {"scale": self.scale}
        if self.zero_point:
            out["zero_point"] = self.zero_point
        if self.alpha is not None:
            out.update(alpha=_base64_float16(self.alpha), shift=_base64_float16(self.shift or ()))
        return out


def float16_values(values: np.ndarray) -> np.ndarray:
    """``values`` rounded to float16 (within its finite range), as float64: what the metadata can hold exactly."""
    limit = float(np.finfo(np.float16).max)
    return np.clip(np.asarray(values, np.float64), -limit, limit).astype(np.float16).astype(np.float64)


def _base64_float16(values: tuple[float, ...]) -> str:
    return base64.b64encode(np.asarray(values, "<f2").tobytes()).decode("ascii")


def _from_base64_float16(text: object) -> np.ndarray | None:
    if not isinstance(text, str):
        return None
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError):
        return None
    return np.frombuffer(raw, "<f2").astype(np.float64) if raw and len(raw) % 2 == 0 else None


def _positive(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < math.inf


def _parsed(name: str, entry: object) -> OutputQuantizer:
    if not isinstance(entry, Mapping) or not _positive(entry.get("scale")):
        raise ValueError(f"metadata {KEY}: {name!r} needs a positive finite 'scale', got {entry!r:.200}")
    zero_point = entry.get("zero_point", 0)
    if isinstance(zero_point, bool) or not isinstance(zero_point, int) or not -128 <= zero_point <= 127:
        raise ValueError(f"metadata {KEY}: {name!r} needs an integer 'zero_point' in [-128, 127], got {zero_point!r}")
    alpha, shift = entry.get("alpha"), entry.get("shift")
    if alpha is None and shift is None:
        return OutputQuantizer(float(entry["scale"]), zero_point=zero_point)
    alpha, shift = _from_base64_float16(alpha), _from_base64_float16(shift)
    if alpha is None or shift is None or len(alpha) != len(shift) or not np.all(alpha > 0) \
            or not np.all(np.isfinite(alpha)) or not np.all(np.isfinite(shift)):
        raise ValueError(f"metadata {KEY}: {name!r} needs 'alpha' (positive) and 'shift': base64 little-endian "
                         "float16 arrays of one length")
    return OutputQuantizer(float(entry["scale"]), tuple(float(a) for a in alpha), tuple(float(s) for s in shift),
                           zero_point)


def read_output_quantizers(model: onnx.ModelProto) -> dict[str, OutputQuantizer]:
    """The output quantizers ``model`` records (none when ``KEY`` is absent); ``ValueError`` naming the key when
    the entry is malformed."""
    raw = next((p.value for p in model.metadata_props if p.key == KEY), None)
    if raw is None:
        return {}
    try:
        entries = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ValueError(f"metadata {KEY} is not JSON: {err}") from err
    if not isinstance(entries, dict):
        raise ValueError(f"metadata {KEY} must be a JSON object of convolution outputs, got {raw[:200]}")
    return {str(name): _parsed(str(name), entry) for name, entry in entries.items()}


def metadata_value(quantizers: Mapping[str, OutputQuantizer]) -> str:
    """``KEY``'s value for ``quantizers``."""
    return json.dumps({name: q.to_json() for name, q in sorted(quantizers.items())}, sort_keys=True)


def output_quantizer_convs(model: onnx.ModelProto, min_channels: int = MIN_CHANNELS) -> list[onnx.NodeProto]:
    """Convolutions ONNX Runtime would run as QLinearConv if their output were quantized: a per-tensor FP32
    activation DequantizeLinear fed by a QuantizeLinear and a symmetric int8 weight in, at least
    ``min_channels`` input channels, and an output read in float (not a graph output, not already read by a
    lone QuantizeLinear or by a Relu → QuantizeLinear, which ``ort_fused.fuse_relu_quantize`` takes)."""
    producer, readers = _graph_maps(model.graph)
    inits = {i.name: i for i in model.graph.initializer}
    outputs = {o.name for o in model.graph.output}
    found = []
    for conv in [n for n in model.graph.node if n.op_type == "Conv"]:
        if not quantized_conv_inputs(conv, producer, inits, min_channels) or \
                inits[producer[conv.input[0]].input[1]].data_type != onnx.TensorProto.FLOAT:
            continue
        users = readers.get(conv.output[0], [])
        if conv.output[0] in outputs or not users or (len(users) == 1 and users[0].op_type == "QuantizeLinear"):
            continue
        if len(users) == 1 and users[0].op_type == "Relu" and \
                [r.op_type for r in readers.get(users[0].output[0], [])] == ["QuantizeLinear"]:
            continue
        found.append(conv)
    return found


def instance_norm_epsilon(conv: onnx.NodeProto, model: onnx.ModelProto,
                          readers: Mapping[str, list[onnx.NodeProto]] | None = None) -> float | None:
    """The epsilon of the InstanceNormalization that alone reads ``conv``'s output (None: equalization does not
    apply); ``readers``: the graph's tensor → reading nodes map, when the caller has it."""
    users = readers.get(conv.output[0], []) if readers is not None else \
        [n for n in model.graph.node if conv.output[0] in n.input]
    if len(users) != 1 or users[0].op_type != "InstanceNormalization" or users[0].input[0] != conv.output[0]:
        return None
    return next((float(helper.get_attribute_value(a)) for a in users[0].attribute if a.name == "epsilon"), 1e-5)


def _equalization_target(conv: onnx.NodeProto, q: OutputQuantizer, model: onnx.ModelProto,
                         producer: Mapping[str, onnx.NodeProto], readers: Mapping[str, list[onnx.NodeProto]],
                         inits: Mapping[str, onnx.TensorProto]) -> tuple[np.ndarray, np.ndarray] | None:
    """``conv``'s per-channel weight scales and bias (zeros when it has none) that ``q``'s equalization would
    change; None when the structure does not allow it (no lone InstanceNorm reader, another channel count, a
    shared weight DequantizeLinear, a bias that is not a constant)."""
    wdq = producer[conv.input[1]]
    weight_scale = numpy_helper.to_array(inits[wdq.input[1]]).astype(np.float32)
    channels = len(q.alpha or ())
    if instance_norm_epsilon(conv, model, readers) is None or weight_scale.shape != (channels,) \
            or readers.get(wdq.output[0]) != [conv]:
        return None
    bias_name = _bias_name(conv, producer)
    if bias_name and bias_name not in inits:
        return None
    bias = numpy_helper.to_array(inits[bias_name]).astype(np.float32) if bias_name else np.zeros(channels, np.float32)
    return (weight_scale, bias) if bias.shape == (channels,) else None


def _bias_name(conv: onnx.NodeProto, producer: Mapping[str, onnx.NodeProto]) -> str:
    """``conv``'s bias input ("" for none), followed through Identity nodes (an exporter's shared copy of an
    equal tensor)."""
    name = conv.input[2] if len(conv.input) > 2 else ""
    while name and producer.get(name) is not None and producer[name].op_type == "Identity":
        name = producer[name].input[0]
    return name


def _applicable(model: onnx.ModelProto, quantizers: Mapping[str, OutputQuantizer], min_channels: int,
                producer: Mapping[str, onnx.NodeProto], readers: Mapping[str, list[onnx.NodeProto]],
                inits: Mapping[str, onnx.TensorProto]
                ) -> list[tuple[onnx.NodeProto, OutputQuantizer, tuple[np.ndarray, np.ndarray] | None]]:
    """Each ``output_quantizer_convs`` convolution with a quantizer that applies to it: (conv, quantizer, its
    ``_equalization_target``, None for an unequalized one)."""
    found = []
    for conv in output_quantizer_convs(model, min_channels):
        q = quantizers.get(conv.output[0])
        target = None if q is None or q.alpha is None else \
            _equalization_target(conv, q, model, producer, readers, inits)
        if q is not None and (q.alpha is None or target is not None):
            found.append((conv, q, target))
    return found


def applicable_output_quantizers(model: onnx.ModelProto, quantizers: Mapping[str, OutputQuantizer],
                                 min_channels: int = MIN_CHANNELS) -> list[str]:
    """The outputs of ``quantizers`` that ``add_output_quantizers`` would quantize in ``model`` (read only)."""
    producer, readers = _graph_maps(model.graph)
    inits = {i.name: i for i in model.graph.initializer}
    return [conv.output[0] for conv, _, _ in _applicable(model, quantizers, min_channels, producer, readers, inits)]


def _equalize(conv: onnx.NodeProto, q: OutputQuantizer, target: tuple[np.ndarray, np.ndarray],
              model: onnx.ModelProto, producer: Mapping[str, onnx.NodeProto]) -> None:
    """Scale ``conv``'s weight scales by ``q.alpha`` and set its bias to ``alpha * (bias - shift)`` (new
    initializers), from its ``_equalization_target``."""
    weight_scale, bias = target
    alpha, shift = np.asarray(q.alpha, np.float32), np.asarray(q.shift, np.float32)
    out = conv.output[0]
    model.graph.initializer.extend([
        numpy_helper.from_array((weight_scale * alpha).astype(np.float32), f"{out}/ort_weight_scale"),
        numpy_helper.from_array((alpha * (bias - shift)).astype(np.float32), f"{out}/ort_bias")])
    producer[conv.input[1]].input[1] = f"{out}/ort_weight_scale"
    while len(conv.input) < 3:
        conv.input.append("")
    conv.input[2] = f"{out}/ort_bias"


def add_output_quantizers(model: onnx.ModelProto, quantizers: Mapping[str, OutputQuantizer],
                          min_channels: int = MIN_CHANNELS) -> list[str]:
    """Put ``Q(s8, scale, zero_point) → DQ`` after each ``output_quantizer_convs`` convolution whose output is in
    ``quantizers`` (equalized first where it says so; a convolution whose equalization does not apply is left
    as it is). Every reader then reads the dequantized tensor. Returns the outputs that got one."""
    graph = model.graph
    producer, readers = _graph_maps(graph)  # another convolution's quantizers leave these as they are
    inits = {i.name: i for i in graph.initializer}
    added: list[str] = []
    for conv, q, target in _applicable(model, quantizers, min_channels, producer, readers, inits):
        out = conv.output[0]
        if target is not None:
            _equalize(conv, q, target, model, producer)
        scale, zero = f"{out}/ort_output_scale", f"{out}/ort_output_zero_point"
        graph.initializer.extend([numpy_helper.from_array(np.array(q.scale, np.float32), scale),
                                  numpy_helper.from_array(np.array(q.zero_point, np.int8), zero)])
        for reader in readers[out]:
            reader.input[:] = [f"{out}/ort_dq" if name == out else name for name in reader.input]
        at = list(graph.node).index(conv) + 1
        graph.node.insert(at, helper.make_node("DequantizeLinear", [f"{out}/ort_q", scale, zero], [f"{out}/ort_dq"],
                                               name=f"{conv.name}/ort_output_DQ"))
        graph.node.insert(at, helper.make_node("QuantizeLinear", [out, scale, zero], [f"{out}/ort_q"],
                                               name=f"{conv.name}/ort_output_Q"))
        added.append(out)
    return added
