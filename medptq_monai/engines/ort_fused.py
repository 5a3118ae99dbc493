"""An ONNX Runtime-specific load-time copy of a QDQ model: integer convolutions where they are free.

The INT8 file puts Q/DQ only on convolution inputs (TensorRT's placement). ONNX Runtime's CPU provider
turns ``DQ(x), DQ(w) → Conv → Q`` into an integer QLinearConv, and nothing else: a convolution whose
output is read in float runs as a float convolution after a run-time DequantizeLinear of its weights,
which also stops ONNX Runtime from folding a following BatchNormalization and from pre-packing the
weights. Two rewrites, applied to a copy at load time (the file on disk, which TensorRT reads, is
unchanged):

* ``fuse_relu_quantize``: ``DQ(x), DQ(w) → Conv → Relu → Q(s8, s, 0)`` where the Relu and the Q are
  the only readers becomes ``Conv → Q(u8, s, 0)`` (and its DequantizeLinear readers read u8): a u8
  quantizer with zero point 0 clips at 0, which is the Relu, so ONNX Runtime fuses the group into a
  QLinearConv with a u8 output. The file's s8 quantizer also clips at 127·s; the u8 one clips at 255·s,
  so values above 127·s (the file's saturated ones) keep more of their magnitude: the only difference,
  and one towards the FP32 result. Only convolutions with at least ``min_channels`` input channels are
  rewritten: ONNX Runtime's 3-D QLinearConv (channels-last, with transposes at the float boundaries)
  is slower than its float convolution on few channels at high resolution (see ``reports/ort_int8.md``).
* ``fold_weight_dequantize``: a DequantizeLinear of a constant weight read only by convolutions that
  ONNX Runtime will not fuse becomes its float initializer, computed as ONNX Runtime computes it
  (``float32(q - zero_point) * scale``): the same values, dequantized once instead of every run.

What this cannot reach (``reports/ort_int8.md``, ``scripts/ort_int8_speed.py``): ConvTranspose has no integer
kernel in ONNX Runtime's CPU provider, and a convolution read in float (by InstanceNorm/BatchNorm, a residual
Add, a Concat) has no fast integer kernel (ConvInteger with a float epilogue is slower than the float
convolution); QLinearConv there would need an 8-bit output quantizer the file does not have. On the demo
U-Net the fusable convolutions are 2-3% of ONNX Runtime FP32's kernel time; on SegResNet and nnU-Net none.
Output quantizers that the file records for ONNX Runtime only reach the rest (``ort_output_quantizers``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..export.onnx_model import drop_unused

CONV_OPS = ("Conv", "ConvTranspose")
# input channels from which ORT's 3-D QLinearConv beats its float Conv (reports/ort_int8.md, Xeon-AMX: 1.2-7.8x
# from 32 channels, 0.2-0.5x at 8-16 channels and 48³-96³)
MIN_CHANNELS = 32


@dataclass(frozen=True)
class OrtFusion:
    """What the ONNX Runtime copy changed: convolutions fused with their Relu-fed quantizer, weights folded, and
    convolutions fused through an output quantizer the file records for ONNX Runtime (``ort_output_quantizers``)."""

    fused_convolutions: int
    folded_weights: int
    output_quantizers: int = 0

    def __bool__(self) -> bool:
        return bool(self.fused_convolutions or self.folded_weights or self.output_quantizers)


def make_ort_fused(model: onnx.ModelProto, min_channels: int = MIN_CHANNELS, fuse: bool = True) -> OrtFusion:
    """Rewrite ``model`` in place (module docstring): fuse Relu-fed quantizers (unless ``fuse`` is False,
    e.g. on a CPU whose INT8 sums saturate), then fold the weights of convolutions ORT runs in float."""
    fused = fuse_relu_quantize(model, min_channels) if fuse else 0
    return OrtFusion(fused, fold_weight_dequantize(model))


def describe_fusion(fusion: OrtFusion) -> str:
    """For ``describe()``: what the ONNX Runtime copy changed."""
    return (f"ORT-fused copy: {fusion.fused_convolutions + fusion.output_quantizers} QLinearConv groups "
            f"({fusion.output_quantizers} through the file's ONNX Runtime output quantizers), "
            f"{fusion.folded_weights} weights dequantized at load")


def _graph_maps(graph: onnx.GraphProto) -> tuple[dict[str, onnx.NodeProto], dict[str, list[onnx.NodeProto]]]:
    producer = {o: n for n in graph.node for o in n.output}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            if name:
                readers.setdefault(name, []).append(node)
    return producer, readers


def _const(name: str, inits: dict[str, onnx.TensorProto]) -> np.ndarray | None:
    return numpy_helper.to_array(inits[name]) if name in inits else None


def _zero_point(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> np.ndarray | None:
    """The zero point of a Q/DQ node; an absent one is uint8 0 (the ONNX default); None when computed."""
    if len(node.input) < 3 or not node.input[2]:
        return np.array(0, np.uint8)
    return _const(node.input[2], inits)


def _is_weight_dq(node: onnx.NodeProto | None, inits: dict[str, onnx.TensorProto]) -> bool:
    """A DequantizeLinear of a constant int8 weight with a zero zero point (symmetric, as our files write)."""
    if node is None or node.op_type != "DequantizeLinear" or node.input[0] not in inits or node.input[1] not in inits:
        return False
    zp = _zero_point(node, inits)
    return inits[node.input[0]].data_type == onnx.TensorProto.INT8 and zp is not None and not np.any(zp)


def _is_activation_dq(node: onnx.NodeProto | None, inits: dict[str, onnx.TensorProto]) -> bool:
    """A per-tensor DequantizeLinear of a computed 8-bit tensor, with constant scale and zero point."""
    if node is None or node.op_type != "DequantizeLinear" or node.input[0] in inits:
        return False
    scale, zp = _const(node.input[1], inits), _zero_point(node, inits)
    return scale is not None and scale.size == 1 and zp is not None and zp.size == 1


def _input_channels(conv: onnx.NodeProto, weight: np.ndarray) -> int:
    group = next((helper.get_attribute_value(a) for a in conv.attribute if a.name == "group"), 1)
    return int(weight.shape[1]) * int(group)


def quantized_conv_inputs(conv: onnx.NodeProto, producer: dict[str, onnx.NodeProto],
                          inits: dict[str, onnx.TensorProto], min_channels: int) -> bool:
    """What QLinearConv needs on ``conv``'s inputs: a per-tensor activation DequantizeLinear fed by a
    QuantizeLinear, a symmetric int8 weight DequantizeLinear, and at least ``min_channels`` input channels."""
    xdq = producer.get(conv.input[0])
    wdq = producer.get(conv.input[1]) if len(conv.input) > 1 else None
    if not (_is_activation_dq(xdq, inits) and _is_weight_dq(wdq, inits)):
        return False
    xq = producer.get(xdq.input[0])
    return xq is not None and xq.op_type == "QuantizeLinear" and \
        _input_channels(conv, numpy_helper.to_array(inits[wdq.input[0]])) >= min_channels


def fuse_relu_quantize(model: onnx.ModelProto, min_channels: int = MIN_CHANNELS) -> int:
    """``DQ(x), DQ(w) → Conv → Relu → Q(s8, s, 0)`` becomes ``Conv → Q(u8, s, 0)`` (module docstring) for
    convolutions with at least ``min_channels`` input channels; returns how many."""
    graph = model.graph
    producer, readers = _graph_maps(graph)
    inits = {i.name: i for i in graph.initializer}
    outputs = {o.name for o in graph.output}
    fused: list[onnx.NodeProto] = []
    for conv in [n for n in graph.node if n.op_type == "Conv"]:
        if not quantized_conv_inputs(conv, producer, inits, min_channels):
            continue
        relus = readers.get(conv.output[0], [])
        if len(relus) != 1 or relus[0].op_type != "Relu" or conv.output[0] in outputs:
            continue
        relu = relus[0]
        qs = readers.get(relu.output[0], [])
        if len(qs) != 1 or qs[0].op_type != "QuantizeLinear" or relu.output[0] in outputs:
            continue
        q = qs[0]
        scale, zp = _const(q.input[1], inits), _zero_point(q, inits)
        if scale is None or scale.size != 1 or zp is None or zp.dtype != np.int8 or np.any(zp):
            continue
        dqs = readers.get(q.output[0], [])
        if q.output[0] in outputs or not dqs or any(d.op_type != "DequantizeLinear" or d.input[1] != q.input[1]
                                                     for d in dqs):
            continue
        zp_u8 = f"{q.output[0]}/u8_zero_point"
        graph.initializer.append(numpy_helper.from_array(np.array(0, np.uint8), zp_u8))
        inits[zp_u8] = graph.initializer[-1]
        while len(q.input) < 3:
            q.input.append("")
        q.input[0], q.input[2] = conv.output[0], zp_u8
        for dq in dqs:
            while len(dq.input) < 3:
                dq.input.append("")
            dq.input[2] = zp_u8
        graph.node.remove(relu)
        fused.append(conv)
    for conv in fused:  # ORT fuses only when input and output share a type: u8 here
        _unsigned_quantizer(producer.get(producer[conv.input[0]].input[0]), readers, inits, graph)
    if fused:
        drop_unused(model)
    return len(fused)


def _unsigned_quantizer(q: onnx.NodeProto | None, readers: dict[str, list[onnx.NodeProto]],
                        inits: dict[str, onnx.TensorProto], graph: onnx.GraphProto) -> bool:
    """``Q(s8, s, 0)`` and its DequantizeLinear readers become ``Q(u8, s, 128)``: the same values, shifted."""
    if q is None or q.op_type != "QuantizeLinear":
        return False
    zp = _zero_point(q, inits)
    if zp is None or zp.dtype != np.int8 or np.any(zp):
        return False
    dqs = readers.get(q.output[0], [])
    if any(d.op_type != "DequantizeLinear" or d.input[1] != q.input[1] for d in dqs):
        return False
    zp_name = f"{q.output[0]}/u8_zero_point_128"
    graph.initializer.append(numpy_helper.from_array(np.array(128, np.uint8), zp_name))
    inits[zp_name] = graph.initializer[-1]
    for node in [q, *dqs]:
        while len(node.input) < 3:
            node.input.append("")
        node.input[2] = zp_name
    return True


def _fused_by_ort(conv: onnx.NodeProto, producer: dict[str, onnx.NodeProto],
                  readers: dict[str, list[onnx.NodeProto]], inits: dict[str, onnx.TensorProto]) -> bool:
    """True when ONNX Runtime will fuse this convolution's QDQ group (DQ inputs, a lone Q reader)."""
    out = readers.get(conv.output[0], [])
    return (conv.op_type == "Conv" and _is_activation_dq(producer.get(conv.input[0]), inits)
            and len(out) == 1 and out[0].op_type == "QuantizeLinear")


def dequantized(q: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None, axis: int) -> np.ndarray:
    """``float32(q - zero_point) * scale`` along ``axis`` (per tensor when ``scale`` is a scalar), as ORT does."""
    shape = [1] * q.ndim
    if scale.size > 1:
        shape[axis] = -1
    zp = np.zeros((), np.int32) if zero_point is None else zero_point.astype(np.int32).reshape(shape)
    centred = (q.astype(np.int32) - zp).astype(np.float32)
    return centred * scale.astype(np.float32).reshape(shape)


def fold_weight_dequantize(model: onnx.ModelProto, ops: Iterable[str] = CONV_OPS) -> int:
    """Replace each DequantizeLinear of a constant weight that only unfused ``ops`` read by its float values;
    returns how many."""
    graph = model.graph
    producer, readers = _graph_maps(graph)
    inits = {i.name: i for i in graph.initializer}
    ops = tuple(ops)
    done = 0
    for dq in [n for n in graph.node if n.op_type == "DequantizeLinear"]:
        if dq.input[0] not in inits or dq.input[1] not in inits:
            continue
        if len(dq.input) > 2 and dq.input[2] and dq.input[2] not in inits:
            continue
        users = readers.get(dq.output[0], [])
        if not users or any(u.op_type not in ops or _fused_by_ort(u, producer, readers, inits) for u in users):
            continue
        q = numpy_helper.to_array(inits[dq.input[0]])
        axis = next((helper.get_attribute_value(a) for a in dq.attribute if a.name == "axis"), 1)
        zp = _const(dq.input[2], inits) if len(dq.input) > 2 and dq.input[2] else None
        scale = numpy_helper.to_array(inits[dq.input[1]])
        # DequantizeLinear outputs its scale's type: float16 in an FP16-remainder file (export/fp16_remainder.py)
        values = dequantized(q, scale, zp, axis % max(q.ndim, 1)).astype(scale.dtype, copy=False)
        graph.initializer.append(numpy_helper.from_array(values, dq.output[0]))
        graph.node.remove(dq)
        done += 1
    if done:
        drop_unused(model)
    return done
