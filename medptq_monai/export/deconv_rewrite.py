"""ConvTranspose (stride 2, kernel 2) → 1x1x1 Conv with 2^n x the channels + depth-to-space (Reshape/Transpose).

Under explicit quantization TensorRT has been reported to run ConvTranspose3d in FP16/FP32 rather than
INT8 (NVIDIA/Model-Optimizer#688, NVIDIA/TensorRT#4668). With kernel == stride == 2, no padding, no
output padding, dilation 1 and one group, every output voxel receives exactly one kernel tap:

    y[n, o, 2d+a, 2h+b, 2w+c] = sum_i x[n, i, d, h, w] * W[i, o, a, b, c] + bias[o]

which is a 1x1x1 convolution with ``Cout * 8`` output channels, channel ``(o, a, b, c)`` holding
``W[i, o, a, b, c]``, followed by a 3-D depth-to-space. ONNX's ``DepthToSpace`` is 4-D only, so the
rearrangement is ``Reshape (N, Cout, 2, 2, 2, D, H, W) → Transpose → Reshape (N, Cout, 2D, 2H, 2W)``.
NVIDIA's MLPerf 3D-UNet submission uses the same replacement. Works for 1 to 3 spatial dims.

The rewrite is exact in FP32 (``tests/test_deconv_rewrite.py``: ONNX Runtime without graph
optimisation). In a QDQ file the new Conv reads the ConvTranspose's activation DQ unchanged and gets
int8 weights per output channel (axis 0, the layout TensorRT takes for Conv weights): requantized per
channel from the FP32 weights when they are given, otherwise the file's own int8 values with the
per-tensor (or per-``Cout``) scale repeated per channel, which reproduces the file's numbers exactly.
Other ConvTranspose nodes are left alone and reported with the reason.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..errors import ModelFileError
from .onnx_model import drop_unused, load_onnx, save_onnx, set_metadata

_DQ = "DequantizeLinear"
INT8_MAX = 127  # symmetric weights: [-127, 127], as the quantizer writes them


@dataclass
class DeconvRewrite:
    """ConvTranspose nodes rewritten and those left alone (node name → reason)."""

    rewritten: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    requantized: bool = False  # int8 weights re-derived per channel from FP32 weights

    def metadata(self) -> dict[str, object]:
        """``medptq.*`` keys recorded in a rewritten file."""
        meta: dict[str, object] = {
            "medptq.deconv_rewrite": "stride2-kernel2 ConvTranspose -> Conv1x1 + depth-to-space",
            "medptq.deconv_rewritten": len(self.rewritten),
        }
        if self.skipped:
            meta["medptq.deconv_skipped"] = "; ".join(f"{k}: {v}" for k, v in self.skipped.items())
        if self.rewritten and self.requantized:
            meta["medptq.deconv_weights"] = "int8 per output channel, requantized from FP32"
        return meta


def _attrs(node: onnx.NodeProto) -> dict[str, object]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _why_not(node: onnx.NodeProto, weight_shape: tuple[int, ...] | None) -> str | None:
    """None when ``node`` is a plain stride-2 kernel-2 ConvTranspose, else the reason it is not."""
    if weight_shape is None:
        return "weight is not a constant (initializer or DequantizeLinear of one)"
    spatial = len(weight_shape) - 2
    if not 1 <= spatial <= 3:
        return f"weight rank {len(weight_shape)} (1 to 3 spatial dims supported)"
    a = _attrs(node)
    if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", b"VALID", "NOTSET", "VALID"):
        return f"auto_pad {a['auto_pad']!r}"
    checks = (
        ("group", int(a.get("group", 1)) == 1, a.get("group")),
        ("kernel", tuple(weight_shape[2:]) == (2,) * spatial and list(a.get("kernel_shape", [2] * spatial))
         == [2] * spatial, tuple(weight_shape[2:])),
        ("strides", list(a.get("strides", [1] * spatial)) == [2] * spatial, a.get("strides", [1] * spatial)),
        ("pads", not any(a.get("pads", [])), a.get("pads")),
        ("output_padding", not any(a.get("output_padding", [])), a.get("output_padding")),
        ("dilations", all(d == 1 for d in a.get("dilations", [1] * spatial)), a.get("dilations")),
        ("output_shape", "output_shape" not in a, a.get("output_shape")),
    )
    for what, ok, value in checks:
        if not ok:
            return f"{what} {list(value) if isinstance(value, (list, tuple)) else value} (needs stride 2, kernel 2, " \
                   "no pads/output_padding/output_shape, dilation 1, group 1)"
    return None


def _conv_layout(w: np.ndarray) -> np.ndarray:
    """(Cin, Cout, 2, ..., 2) ConvTranspose weight → (Cout * 2^n, Cin, 1, ..., 1) Conv weight."""
    spatial = w.ndim - 2
    cin, cout = w.shape[:2]
    moved = np.transpose(w, (1, *range(2, w.ndim), 0))  # (Cout, 2, .., 2, Cin): channel (o, a, b, c)
    return np.ascontiguousarray(moved.reshape(cout * 2 ** spatial, cin, *([1] * spatial)))


def _quantize_per_channel(w: np.ndarray, scale_dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per output channel (axis 0): ``scale = max|w| / 127`` (1 for an all-zero channel)."""
    absmax = np.abs(w.reshape(w.shape[0], -1)).max(axis=1).astype(np.float64)
    scale = np.where(absmax > 0, absmax / INT8_MAX, 1.0).astype(scale_dtype)
    shape = (-1,) + (1,) * (w.ndim - 1)
    q = np.clip(np.rint(w / scale.astype(np.float64).reshape(shape)), -INT8_MAX, INT8_MAX).astype(np.int8)
    return q, scale


class _Index:
    def __init__(self, model: onnx.ModelProto) -> None:
        self.inits = {i.name: i for i in model.graph.initializer}
        self.producer = {o: n for n in model.graph.node for o in n.output}
        self.shapes: dict[str, tuple[int | None, ...]] = {}
        inferred = onnx.shape_inference.infer_shapes(_without_weights(model))
        for vi in (*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output):
            if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
                self.shapes[vi.name] = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
                                             for d in vi.type.tensor_type.shape.dim)
        self.names = {n.name for n in model.graph.node} | {o for n in model.graph.node for o in n.output} | set(
            self.inits)

    def unique(self, base: str) -> str:
        name, k = base, 1
        while name in self.names:
            name, k = f"{base}_{k}", k + 1
        self.names.add(name)
        return name


def _without_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy for shape inference: initializers over 4 KiB become graph inputs of the same type and shape
    (small ones, such as Reshape targets, keep their values)."""
    light = onnx.ModelProto()
    light.ir_version = model.ir_version
    light.opset_import.extend(model.opset_import)
    g = light.graph
    g.node.extend(model.graph.node)
    g.input.extend(model.graph.input)
    g.output.extend(model.graph.output)
    known = {i.name for i in model.graph.input}
    for init in model.graph.initializer:
        if init.ByteSize() <= 4096:
            g.initializer.append(init)
        elif init.name not in known:
            g.input.append(helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    return light


def _weight(index: _Index, node: onnx.NodeProto) -> tuple[str, np.ndarray | None, onnx.NodeProto | None]:
    """(kind, array, weight DQ): kind 'float' (array = FP32 weight), 'int8' (array = int8 values) or ''."""
    name = node.input[1] if len(node.input) > 1 else ""
    if name in index.inits:
        return "float", numpy_helper.to_array(index.inits[name]), None
    dq = index.producer.get(name)
    if dq is not None and dq.op_type == _DQ and dq.input[0] in index.inits:
        q = numpy_helper.to_array(index.inits[dq.input[0]])
        if q.dtype == np.int8:
            return "int8", q, dq
    return "", None, None


def _dq_scale(index: _Index, dq: onnx.NodeProto, w_shape: tuple[int, ...]) -> tuple[np.ndarray, str] | None:
    """The DQ's scale expanded to the ``Cout * 2^n`` Conv channels, or None when its axis is Cin."""
    scale_init = index.inits.get(dq.input[1])
    if scale_init is None:
        return None
    scale = numpy_helper.to_array(scale_init)
    spatial = len(w_shape) - 2
    if scale.size == 1:
        return np.full(w_shape[1] * 2 ** spatial, scale.reshape(()), dtype=scale.dtype), "per tensor"
    axis = next((int(helper.get_attribute_value(a)) for a in dq.attribute if a.name == "axis"), 1)
    axis = axis + len(w_shape) if axis < 0 else axis
    if axis == 1 and scale.size == w_shape[1]:
        return np.repeat(scale, 2 ** spatial), "per Cout"
    return None


def float_deconv_weights(fp32: onnx.ModelProto) -> dict[str, np.ndarray]:
    """FP32 weights of the ConvTranspose nodes of an FP32 model, by node name (to requantize per channel)."""
    inits = {i.name: i for i in fp32.graph.initializer}
    return {n.name: numpy_helper.to_array(inits[n.input[1]]) for n in fp32.graph.node
            if n.op_type == "ConvTranspose" and n.name and len(n.input) > 1 and n.input[1] in inits}


def _shape_nodes(index: _Index, base: str, x: str, cout: int, spatial: int, dims: tuple[int | None, ...] | None
                 ) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto], str, str]:
    """Nodes and initializers computing the two Reshape targets; constants when the spatial dims are known."""
    def const(values: list[int], name: str) -> onnx.TensorProto:
        return numpy_helper.from_array(np.array(values, np.int64), index.unique(f"{base}/{name}"))

    if dims is not None and len(dims) == spatial + 2 and all(d is not None for d in dims[2:]):
        sp = [int(d) for d in dims[2:]]  # type: ignore[arg-type]
        split_c = const([-1, cout, *([2] * spatial), *sp], "split_shape")
        merge_c = const([-1, cout, *[2 * d for d in sp]], "merge_shape")
        return [], [split_c, merge_c], split_c.name, merge_c.name
    head_split, head_merge = const([-1, cout, *([2] * spatial)], "split_head"), const([-1, cout], "merge_head")
    starts, ends, two = const([2], "spatial_start"), const([2 + spatial], "spatial_end"), const([2], "two")
    shape, sp_in, sp_out, split, merge = (index.unique(f"{base}/{n}") for n in
                                          ("x_shape", "x_spatial", "y_spatial", "split_shape", "merge_shape"))
    nodes = [
        helper.make_node("Shape", [x], [shape], name=index.unique(f"{base}/Shape")),
        helper.make_node("Slice", [shape, starts.name, ends.name], [sp_in], name=index.unique(f"{base}/Slice")),
        helper.make_node("Mul", [sp_in, two.name], [sp_out], name=index.unique(f"{base}/Mul")),
        helper.make_node("Concat", [head_split.name, sp_in], [split], axis=0,
                         name=index.unique(f"{base}/Concat_split")),
        helper.make_node("Concat", [head_merge.name, sp_out], [merge], axis=0,
                         name=index.unique(f"{base}/Concat_merge")),
    ]
    return nodes, [head_split, head_merge, starts, ends, two], split, merge


def rewrite_deconv(model: onnx.ModelProto, float_weights: Mapping[str, np.ndarray] | None = None) -> DeconvRewrite:
    """Rewrite, in place, every stride-2 kernel-2 ConvTranspose of ``model`` (FP32 or QDQ); see the module doc.

    ``float_weights`` (node name → FP32 ConvTranspose weight, :func:`float_deconv_weights`) makes the int8
    weights of a QDQ ConvTranspose be requantized per output channel of the new Conv.
    """
    index = _Index(model)
    report = DeconvRewrite()
    graph = model.graph
    new_nodes: list[onnx.NodeProto] = []
    for node in list(graph.node):
        if node.op_type != "ConvTranspose" or node.domain not in ("", "ai.onnx"):
            new_nodes.append(node)
            continue
        name = node.name or node.output[0]
        kind, w, w_dq = _weight(index, node)
        reason = _why_not(node, tuple(w.shape) if w is not None else None)
        bias_name = node.input[2] if len(node.input) > 2 else ""
        if reason is None and bias_name and bias_name not in index.inits:
            reason = "bias is not an initializer"
        ref = None
        if reason is None and kind == "int8":
            ref = None if float_weights is None else float_weights.get(node.name)
            if ref is not None and tuple(ref.shape) != tuple(w.shape):  # type: ignore[union-attr]
                raise ModelFileError(f"FP32 weight of {name} has shape {tuple(ref.shape)}, the QDQ file's "
                                     f"{tuple(w.shape)}: not the FP32 source of this file")  # type: ignore[union-attr]
            if ref is None and _dq_scale(index, w_dq, tuple(w.shape)) is None:  # type: ignore[arg-type]
                reason = "per-Cin weight scales (axis 0) and no FP32 weights to requantize per output channel"
        if reason is not None:
            report.skipped[name] = reason
            new_nodes.append(node)
            continue
        assert w is not None
        spatial = w.ndim - 2
        cout = int(w.shape[1])
        base = name
        conv_inputs = [node.input[0]]
        inits: list[onnx.TensorProto] = []
        pre: list[onnx.NodeProto] = []
        if kind == "float":
            wc = numpy_helper.from_array(_conv_layout(w).astype(w.dtype), index.unique(f"{base}/conv1x1_weight"))
            inits.append(wc)
            conv_inputs.append(wc.name)
        else:
            assert w_dq is not None
            scale_dtype = numpy_helper.to_array(index.inits[w_dq.input[1]]).dtype
            if ref is not None:
                q, scale = _quantize_per_channel(_conv_layout(ref.astype(np.float32)), scale_dtype)
                report.requantized = True
            else:
                q = _conv_layout(w)
                scale = _dq_scale(index, w_dq, tuple(w.shape))[0]  # type: ignore[index]
            qi = numpy_helper.from_array(q, index.unique(f"{base}/conv1x1_weight_int8"))
            si = numpy_helper.from_array(scale, index.unique(f"{base}/conv1x1_weight_scale"))
            zi = numpy_helper.from_array(np.zeros(scale.shape, np.int8),
                                         index.unique(f"{base}/conv1x1_weight_zero_point"))
            inits += [qi, si, zi]
            w_out = index.unique(f"{base}/conv1x1_weight_dq")
            pre.append(helper.make_node(_DQ, [qi.name, si.name, zi.name], [w_out], axis=0,
                                        name=index.unique(f"{base}/conv1x1_weight_DequantizeLinear")))
            conv_inputs.append(w_out)
        if bias_name:
            b = numpy_helper.to_array(index.inits[bias_name])
            bi = numpy_helper.from_array(np.repeat(b, 2 ** spatial), index.unique(f"{base}/conv1x1_bias"))
            inits.append(bi)
            conv_inputs.append(bi.name)
        shape_nodes, shape_inits, split_shape, merge_shape = _shape_nodes(
            index, base, node.input[0], cout, spatial, index.shapes.get(node.input[0]))
        inits += shape_inits
        z, zs, zt = (index.unique(f"{base}/{s}") for s in ("conv1x1_out", "split_out", "transpose_out"))
        perm = [0, 1, *[k for i in range(spatial) for k in (2 + spatial + i, 2 + i)]]
        new_nodes += pre + shape_nodes + [
            helper.make_node("Conv", conv_inputs, [z], kernel_shape=[1] * spatial, strides=[1] * spatial,
                             pads=[0] * (2 * spatial), dilations=[1] * spatial, group=1,
                             name=index.unique(f"{base}/Conv1x1")),
            helper.make_node("Reshape", [z, split_shape], [zs], name=index.unique(f"{base}/Reshape_split")),
            helper.make_node("Transpose", [zs], [zt], perm=perm, name=index.unique(f"{base}/Transpose_d2s")),
            helper.make_node("Reshape", [zt, merge_shape], [node.output[0]],
                             name=index.unique(f"{base}/Reshape_merge")),
        ]
        graph.initializer.extend(inits)
        report.rewritten.append(name)
    del graph.node[:]
    graph.node.extend(new_nodes)
    if report.rewritten:
        drop_unused(model)
        _drop_stale_value_info(model)
    return report


def _drop_stale_value_info(model: onnx.ModelProto) -> None:
    live = {o for n in model.graph.node for o in n.output}
    for vi in [v for v in model.graph.value_info if v.name not in live]:
        model.graph.value_info.remove(vi)


def rewrite_deconv_file(src: str | os.PathLike, dst: str | os.PathLike,
                        fp32_source: str | os.PathLike | None = None) -> DeconvRewrite:
    """Rewrite the ONNX file ``src`` into ``dst`` (checked, atomic; nothing written on error).

    ``fp32_source``: the FP32 ONNX the QDQ file was quantized from, to requantize the new Conv weights
    per output channel."""
    model = load_onnx(src)
    weights = float_deconv_weights(load_onnx(fp32_source)) if fp32_source is not None else None
    report = rewrite_deconv(model, weights)
    if not report.rewritten:
        found = "; ".join(f"{k}: {v}" for k, v in report.skipped.items()) or "the model has no ConvTranspose"
        raise ModelFileError(f"{src}: no stride-2 kernel-2 ConvTranspose to rewrite ({found})")
    set_metadata(model, report.metadata())
    save_onnx(model, Path(dst))
    return report
