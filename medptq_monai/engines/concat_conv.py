"""Rewrite QDQ convolutions that read a channel Concat into one convolution per Concat input.

OpenVINO 2026.4 computes ``Concat → QuantizeLinear → DequantizeLinear → Conv`` wrongly on CPU: it
fuses the Concat's requantization into the producers and runs the Concat in u8, and the INT8
convolution after it comes out at ~6 dB SQNR where ONNX Runtime gets ~36 dB on the same file
(a 3-layer reproduction is in ``tests/test_engines.py``). This is every U-Net decoder block that
concatenates the skip connection (nnU-Net, UNETR-style decoders of SwinUNETR, UNesT, TransUNet).

``Conv(Q(concat(a, b)), W) = Conv(Q(a), W[:, :Ca]) + Conv(Q(b), W[:, Ca:])`` with the Concat's scale
for every part is the same arithmetic (per-tensor quantization commutes with the Concat, and the
int8 weights are sliced along input channels, keeping their per-output-channel scales), so the
rewritten model computes exactly what the QDQ model specifies; OpenVINO then runs it correctly.
"""

from __future__ import annotations

import onnx
from onnx import helper, numpy_helper, shape_inference

from ..export.onnx_model import drop_unused


def _channels(model: onnx.ModelProto) -> dict[str, int]:
    """Static channel count (axis 1) of every tensor whose shape inference knows it."""
    inferred = shape_inference.infer_shapes(model)
    channels = {}
    for info in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        dims = info.type.tensor_type.shape.dim
        if len(dims) > 1 and dims[1].HasField("dim_value"):
            channels[info.name] = int(dims[1].dim_value)
    return channels


def split_concat_convolutions(model: onnx.ModelProto) -> int:
    """Rewrite ``model`` in place (see the module docstring); returns how many convolutions were split.

    Only the exact pattern is touched: a channel Concat (axis 1) → QuantizeLinear → DequantizeLinear
    → Conv (group 1) whose weight is DequantizeLinear of an int8 initializer quantized per output
    channel (axis 0), with every Concat input's channel count known.
    """
    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    inits = {i.name: i for i in graph.initializer}
    channels: dict[str, int] | None = None
    split = 0
    for conv in [n for n in graph.node if n.op_type == "Conv"]:
        dq, wdq = producer.get(conv.input[0]), producer.get(conv.input[1])
        q = producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
        cat = producer.get(q.input[0]) if q is not None and q.op_type == "QuantizeLinear" else None
        if cat is None or cat.op_type != "Concat" or len(cat.input) < 2 or wdq is None \
                or wdq.op_type != "DequantizeLinear":
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in conv.attribute}
        axis = {a.name: helper.get_attribute_value(a) for a in cat.attribute}.get("axis")
        waxis = {a.name: helper.get_attribute_value(a) for a in wdq.attribute}.get("axis", 1)
        if axis not in (1, -4) or attrs.get("group", 1) != 1 or wdq.input[0] not in inits or waxis != 0:
            continue
        if channels is None:
            channels = _channels(model)
        sizes = [channels.get(t) for t in cat.input]
        weight = numpy_helper.to_array(inits[wdq.input[0]])
        if any(s is None for s in sizes) or sum(sizes) != weight.shape[1]:
            continue
        nodes, parts, start = [], [], 0
        for i, (tensor, size) in enumerate(zip(cat.input, sizes, strict=True)):
            tag = f"{conv.name}/split{i}"
            w_name = f"{wdq.input[0]}_split{i}"
            graph.initializer.append(numpy_helper.from_array(weight[:, start:start + size].copy(), w_name))
            start += size
            bias = [conv.input[2]] if i == 0 and len(conv.input) > 2 and conv.input[2] else []
            nodes += [
                helper.make_node("QuantizeLinear", [tensor, *q.input[1:]], [f"{tag}/q"], name=f"{tag}/Q"),
                helper.make_node("DequantizeLinear", [f"{tag}/q", *q.input[1:]], [f"{tag}/x"], name=f"{tag}/DQ"),
                helper.make_node("DequantizeLinear", [w_name, *wdq.input[1:]], [f"{tag}/w"], name=f"{tag}/wDQ",
                                 axis=0),
                helper.make_node("Conv", [f"{tag}/x", f"{tag}/w", *bias], [f"{tag}/y"], name=f"{tag}/Conv", **attrs),
            ]
            parts.append(f"{tag}/y")
        total = parts[0]
        for i, part in enumerate(parts[1:], start=1):
            out = conv.output[0] if i == len(parts) - 1 else f"{conv.name}/sum{i}"
            nodes.append(helper.make_node("Add", [total, part], [out], name=f"{conv.name}/Add{i}"))
            total = out
        index = list(graph.node).index(conv)
        graph.node.remove(conv)
        for offset, node in enumerate(nodes):
            graph.node.insert(index + offset, node)
        split += 1
    if split:
        drop_unused(model)
    return split
